"""The test App as a module, for `nerve run tests.http_edge.reply_app:app` in a subprocess."""

from .conftest import Seen, make_app

seen = Seen()
app, endpoints = make_app(seen)
