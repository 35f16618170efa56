"""The HTTP app (thin), its schemas, the served model behind it, and the static page."""
