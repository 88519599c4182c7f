"""twistd plugin: `twistd relay` runs a tunnel-relay node.

No __init__.py lives under twisted/ or twisted/plugins/: this folder is a
namespace shared with Twisted itself (docs/core/howto/plugin.rst)."""

from twisted.application.service import ServiceMaker

# relay.node.service is imported only when twistd actually runs the plugin.
tunnel_relay = ServiceMaker(
    "tunnel-relay", "relay.node.service", "A tunnel-relay node.", "relay"
)
