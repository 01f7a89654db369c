"""The control plane: the aiohttp application and the listening socket.

- ``app``      builds the application: routes, shared state, start-up and shutdown
- ``appkeys``  the typed keys of the application's shared objects
- ``control``  the proxy's own routes (/status, /switch, /stop, /logs/*, ...)
- ``errors``   the one table that maps engine errors to HTTP answers
- ``server``   owns the listening socket; the front door first, aiohttp behind it
"""
