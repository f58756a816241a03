module kmsd

go 1.26.8

require (
	github.com/cloudflare/circl v1.6.5
	go.etcd.io/bbolt v1.5.0
)

require (
	github.com/go-chi/chi/v5 v5.5.0 // indirect
	github.com/miekg/pkcs11 v1.1.2 // indirect
	golang.org/x/sys v0.47.0 // indirect
)
