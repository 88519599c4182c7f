"""The relay node's own parts: the twistd service, the agent port, the tunnel
directory and routing, the shared TLS port, port allocation, the state folder
and the admin API. The agent (`client`) never imports this package.
"""
