"""kproxy run as a process against a stand-in API server or manifests, in namespace topologies."""
