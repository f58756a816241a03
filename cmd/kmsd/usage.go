package main

import (
	"flag"
	"fmt"
	"io"
	"strings"
)

// flagGroups orders kmsd --help: every flag is in exactly one group
// (TestHelpGroupsEveryFlag).
var flagGroups = []struct {
	title string
	flags []string
}{
	{"Listening and TLS", []string{"addr", "tls-cert", "tls-key", "tls-client-ca", "insecure-http", "shutdown-timeout"}},
	{"Storage", []string{"data-dir", "store", "etcd-endpoints", "etcd-prefix", "etcd-ca", "etcd-cert", "etcd-key",
		"s3-endpoint", "s3-bucket", "s3-prefix", "s3-region", "s3-ca", "store-scrub-interval", "upgrade-untagged-store"}},
	{"HSM (PKCS#11)", []string{"pkcs11-module", "pkcs11-token", "pkcs11-pin-file", "kek-label", "pkcs11-wrap"}},
	{"Keys", []string{"key-cache-ttl", "destroy-check-interval", "min-rotation-period", "rotation-check-interval", "max-keyset-mib", "async-keyset-mib", "he-generations", "he-workers", "he-key-form", "peers"}},
	{"Audit log", []string{"audit-checkpoint-every", "audit-checkpoint-interval", "audit-archive", "audit-retain", "audit-stream", "audit-stream-timeout", "audit-wal-mib"}},
	{"Tokens and rate limits", []string{"max-token-ttl", "issuer", "oauth-token-ttl", "unauth-rate-limit", "unauth-burst", "token-rate-limit"}},
	{"Operations", []string{"log-level", "metrics-addr", "metrics-token-file", "debug-addr"}},
}

// metavars name what a flag's value is, where its type says too little.
var metavars = map[string]string{
	"addr": "HOST:PORT", "debug-addr": "HOST:PORT", "metrics-addr": "HOST:PORT", "metrics-token-file": "FILE", "data-dir": "DIR", "store": "bolt|etcd",
	"etcd-endpoints": "URL,...", "etcd-prefix": "PREFIX", "s3-endpoint": "URL", "s3-bucket": "BUCKET", "s3-prefix": "PREFIX", "s3-region": "REGION",
	"etcd-ca": "FILE", "etcd-cert": "FILE", "etcd-key": "FILE", "s3-ca": "FILE", "tls-cert": "FILE", "tls-key": "FILE", "tls-client-ca": "FILE",
	"pkcs11-module": "FILE", "pkcs11-pin-file": "FILE", "pkcs11-token": "LABEL", "kek-label": "LABEL", "pkcs11-wrap": "PROFILE",
	"audit-stream": "FILE|-", "audit-archive": "DIR|s3://BUCKET/PREFIX/", "log-level": "LEVEL",
}

// printUsage prints kmsd --help to w, the defaults read from getenv.
func printUsage(w io.Writer, getenv func(string) string) {
	var c config
	fs, _ := newFlagSetErrs(&c, getenv)
	usage(w, fs)
}

const usageHead = `kmsd: key management service for post-quantum (ML-KEM, ML-DSA) and
homomorphic-encryption (CKKS, BGV) keys. Every secret is sealed under a
non-extractable key in a PKCS#11 HSM; every request leaves a signed,
tamper-evident audit record. With no flags it serves HTTPS on
127.0.0.1:8420 from ./data: a bbolt store and a SoftHSM2 token it creates.

Usage:
  kmsd [flags]
  kmsd --version

Every flag has an environment variable, KMS_ and the flag's name in
capitals with _ for - (shown with each); the flag wins.
`

// usage prints kmsd --help: what kmsd is, then its flags by group.
func usage(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, usageHead)
	for _, g := range flagGroups {
		fmt.Fprintf(w, "\n%s:\n", g.title)
		for _, name := range g.flags {
			f := fs.Lookup(name)
			if f == nil {
				continue
			}
			typ, help := flag.UnquoteUsage(f)
			line := "  --" + f.Name
			if v, ok := metavars[f.Name]; ok {
				typ = v
			} else {
				typ = map[string]string{"string": "VALUE", "int": "N", "uint": "N", "float": "RATE", "duration": "DURATION"}[typ]
			}
			if typ != "" {
				line += " " + typ
			}
			fmt.Fprintln(w, line)
			if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" {
				help += fmt.Sprintf(" (default %s)", f.DefValue)
			}
			for _, l := range wrapText(help, 72) {
				fmt.Fprintf(w, "      %s\n", l)
			}
		}
	}
	fmt.Fprint(w, "\nREADME.md has the walk-throughs, the runbooks and the same table of flags.\n")
}

// wrapText breaks s into lines of at most width runes, at spaces.
func wrapText(s string, width int) []string {
	var lines []string
	line := ""
	for _, w := range strings.Fields(s) {
		if line != "" && len(line)+1+len(w) > width {
			lines = append(lines, line)
			line = ""
		}
		if line != "" {
			line += " "
		}
		line += w
	}
	if line != "" {
		lines = append(lines, line)
	}
	return lines
}
