module kmsd

go 1.26.8

require (
	github.com/cloudflare/circl v1.6.5
	go.etcd.io/bbolt v1.5.0
)

require golang.org/x/sys v0.47.0 // indirect
