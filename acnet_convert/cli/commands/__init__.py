"""One module per acnet command: its examples (``EPILOG``) and ``main``, which parses, calls the library, renders."""
