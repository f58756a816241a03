// Package metrics serves a program's Prometheus metrics (through
// prometheus/client_golang, on a registry of its own, never the global
// one): the Go runtime's and the process's, the build, and what the
// program registers. The listener is loopback-only unless a bearer token
// or mutual TLS protects it (the caller then serves it over TLS, so the
// token never travels in clear).
package metrics

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Registry is one program's metrics.
type Registry struct {
	*prometheus.Registry
	Namespace string
}

// New returns a registry with the Go runtime's and the process's
// collectors and <namespace>_build_info{version,revision,goversion} 1.
func New(namespace string) *Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	version, revision := "(devel)", "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" {
			version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				revision = s.Value
			}
		}
	}
	bi := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Name: "build_info",
		Help:        "Which build is running: always 1, its labels say the module version, the commit and the Go that built it.",
		ConstLabels: prometheus.Labels{"version": version, "revision": revision, "goversion": runtime.Version()},
	})
	bi.Set(1)
	reg.MustRegister(bi)
	return &Registry{Registry: reg, Namespace: namespace}
}

// Handler serves the registry in Prometheus's text (or OpenMetrics)
// format; with a bearer token, only to requests that present it.
func (r *Registry) Handler(bearer string) http.Handler {
	// Two scrapes at a time, each bounded: a scraper looping on the
	// listener waits (503 past two) instead of taking kmsd's cores.
	h := promhttp.HandlerFor(r.Registry, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError, EnableOpenMetrics: true,
		MaxRequestsInFlight: 2, Timeout: 10 * time.Second})
	if bearer == "" {
		return h
	}
	want := sha256.Sum256([]byte(bearer))
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		got := ""
		if scheme, tok, ok := strings.Cut(req.Header.Get("Authorization"), " "); ok && strings.EqualFold(scheme, "Bearer") {
			got = tok
		}
		sum := sha256.Sum256([]byte(got))
		if subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="metrics"`)
			http.Error(w, "a bearer token is required for the metrics (the one in --metrics-token-file)", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, req)
	})
}

// ReadToken reads a bearer token from a file: one line, at least 16
// characters; the file must not be readable by others.
func ReadToken(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("metrics token file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("metrics token file %s: mode %v lets others read it; chmod 600 it", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("metrics token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < 16 || strings.ContainsAny(tok, " \t\r\n") {
		return "", fmt.Errorf("metrics token file %s: the token must be one line of at least 16 characters without spaces", path)
	}
	return tok, nil
}

// CheckAddr refuses a listen address off loopback unless something (a
// bearer token, mutual TLS) protects what it serves.
func CheckAddr(addr string, protected bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("metrics address %q: %w", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip != nil && ip.IsLoopback() {
		return nil
	}
	if !protected {
		return fmt.Errorf("metrics address %q is not a loopback address: protect the metrics with a bearer token (--metrics-token-file) or mutual TLS (--tls-client-ca) to serve them off loopback", addr)
	}
	return nil
}
