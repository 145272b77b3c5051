"""The HTTP layer: the site, its resources and the routes (the only package that imports twisted.web.server)."""
