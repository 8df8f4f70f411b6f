"""Deployment plugins: Litestar plugins this deployment adds, listed by import path in [server] plugins."""
