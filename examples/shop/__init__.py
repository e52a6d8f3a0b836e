"""The shop: nerve's e-commerce case study.

- :mod:`examples.shop.app` — the event types and the five services (start here).
- :mod:`examples.shop.load` — a deterministic order generator and stock seeding.
- :mod:`examples.shop.invariants` — what must hold once the shop is idle.
- :mod:`examples.shop.chaos` — opt-in failure injection for chaos tests.
- :mod:`examples.shop.worker` — ``python -m examples.shop.worker``: run the services.
- :mod:`examples.shop.demo` — ``python -m examples.shop.demo``: all of it, live.
"""
