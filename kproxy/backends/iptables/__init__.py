"""iptables mode: kube-proxy's rules rendered per service port (`render`, `naming`), synced by
diff (`sync`, `adopt`), and the mode as the agent sees it (`proxier`). Writing to the kernel goes
through `kproxy.netfilter`."""
