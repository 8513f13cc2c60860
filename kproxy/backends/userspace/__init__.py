"""Userspace mode: service traffic forwarded by kproxy itself, on uvloop.

The node agent's backend is `mode.UserspaceMode`: per family, one `UserspaceProxier`
(the listeners) and the steering chains that send service traffic to them, rewritten
whole in one `--noflush` restore whenever they change (a handful of rules per port, so
no diffing engine):

    proxier = UserspaceProxier(family=4, engine="raw", hooks=Hooks(connection_limit=..., dial_failure=...))
    await proxier.sync(view)                 # {ServicePortName: (ServicePort, endpoints)}
    ports = proxier.listener_ports()         # ServicePortName -> listener port
    cfg = steering.SteeringConfig(family=4, listen_ip=proxier.bind_ip, host_ip=<node IP>)
    chains = steering.render_all({n: (view[n][0], p) for n, p in ports.items()}, cfg)
    restorer.apply(4, restore_payload(chains), True)   # + restorer.ensure_jumps(4, steering.builtin_jumps(cfg))
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
pure). (bench/userspace_server.py runs a proxier standalone for benchmarks.)
"""
