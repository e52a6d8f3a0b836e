"""Event sources beside HTTP: bridges that turn another protocol's messages into
CloudEvents (:mod:`nerve.sources.mqtt`). Each imports its client library only when
it runs (``nerve[mqtt]``)."""
