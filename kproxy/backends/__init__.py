"""Proxy modes. `base` says what a mode is to the agent; each mode is a package that imports
`kproxy.netfilter` for kernel plumbing and never another mode."""
