print("fsshare-bench: see hack/bench")
