module keepalive-operator/hack/workload

go 1.25
