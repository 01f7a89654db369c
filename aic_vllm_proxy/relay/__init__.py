"""The data plane: every request that is not the proxy's own goes to vLLM from here.

- ``pipeline``    what both paths do with a request for vLLM: admission, exchange, release
- ``front``       the front door: a lean HTTP/1.1 protocol for the common request
- ``passthrough`` the aiohttp adapter: everything the front door hands off
- ``headers``     the header policy of both paths; ``flow`` their one pair of water marks
- ``upstream``    the pool of connections to vLLM and its response parser
- ``routes``      which paths are the proxy's own (one matcher, from the control routes)
- ``auth``        API keys and roles, read the same way on both paths
- ``errors``      HTTP error answers in the OpenAI shape
"""
