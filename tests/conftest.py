"""pytest set-up shared by the tests; helpers they import are in helpers.py."""
