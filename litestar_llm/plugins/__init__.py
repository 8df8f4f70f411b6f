"""Built-in Litestar plugins, one per concern; `litestar_llm.app.create_app` decides which to install."""
