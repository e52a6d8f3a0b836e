"""Example applications built with nerve; start with :mod:`examples.shop`."""
