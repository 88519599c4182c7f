"""The Twisted wire layer both ends use: the mux link adapter, streams as
transports, the splice, stdlib TLS on memory BIOs, socket helpers and the
reactor. Shared by the relay node (`relay.node`) and the agent (`client`);
nothing here knows of tunnels, tokens or routing.
"""
