"""The static HTML report and the local web app, rendered from the same templates."""
