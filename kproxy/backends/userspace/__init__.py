"""Userspace mode: service traffic forwarded by kproxy itself, on uvloop.

How the node agent uses it (one proxier per address family, on the agent's loop):

    proxier = UserspaceProxier(family=4, bind_ip="0.0.0.0", max_connections=100_000,
                               hooks=Hooks(connection_limit=..., dial_failure=...))
    await proxier.sync(view)                 # view = kproxy.state.build.view(snapshot, node, 4)
    ports = proxier.listener_ports()         # ServicePortName -> listener port
    cfg = SteeringConfig(family=4, listen_ip="0.0.0.0", host_ip=<node IP>)
    rules = [steering.render_port(view[n][0], p, cfg) for n, p in ports.items()]
    chains = steering.assemble(rules)        # + steering.builtin_jumps(cfg), for the sync engine
    ...
    await proxier.close(deadline=5.0)

`sync` never drops an established connection: endpoint changes only change where new
connections go, a removed endpoint drains, and a listener keeps its port for as long as
its service port exists.

Per-service load balancing is chosen with the annotation

    metadata:
      annotations:
        kproxy.io/lb-algorithm: least-connections   # or round-robin (default), random

which the parser copies to `Service.lb_algorithm` and the view to
`ServicePort.lb_algorithm`. Unknown values fall back to round robin with a warning.
`sessionAffinity: ClientIP` (with its timeout) applies on top of any algorithm: a client
that has an endpoint keeps it while the endpoint exists and the client keeps using it.

Traffic policies are the kernel modes': `proxier.choose` takes each port's endpoints from
`state.topology` (internal Local, zone hints, terminating fallback); under
externalTrafficPolicy Local a port has a second listener with only node-local endpoints,
and `steering` drops or rejects what a listener has no endpoint for and enforces
loadBalancerSourceRanges. Listeners survive restarts: `handover` keeps them open in a
keeper process for the next kproxy, which adopts the portal rules that point at them.

Modules: `balancer` (endpoint choice, pure), `handover` (the listener keeper), `rawtcp` (default TCP/SCTP engine: plain
sockets, own epoll set, splice for bulk), `tcp` (uvloop Protocol engine, and the shared
`Gate`/`Hooks`), `udp`, `sctp` (kernel support probe), `proxier`, `steering` (nat rules,
pure), `bench_server` (standalone runner for benchmarks).
"""
