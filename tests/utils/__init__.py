"""Shared test factories: images, seeded items, real worker processes, HTTP receivers and fault injectors."""
