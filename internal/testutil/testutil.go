// Package testutil holds small helpers the tests of several packages share.
package testutil

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/internal/tlsutil"
)

// RecordingRand is crypto/rand that remembers what it handed out, so a test
// knows every seed the code under test generated.
type RecordingRand struct {
	mu  sync.Mutex
	out [][]byte
}

func (r *RecordingRand) Read(p []byte) (int, error) {
	n, err := rand.Read(p)
	r.mu.Lock()
	r.out = append(r.out, bytes.Clone(p[:n]))
	r.mu.Unlock()
	return n, err
}

// Taken returns everything read so far.
func (r *RecordingRand) Taken() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.out
}

// Clock is a kms.Clock that moves only when told.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// NewClock starts a clock at t.
func NewClock(t time.Time) *Clock { return &Clock{t: t} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Add moves the clock forward.
func (c *Clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// Buffer is a bytes.Buffer safe for concurrent writers (a log sink).
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TLSServer serves h over HTTPS on 127.0.0.1 with kmsd's TLS configuration,
// under a CA made for the test, and returns the server and the CA file.
func TLSServer(t testing.TB, h http.Handler) (*httptest.Server, string) {
	t.Helper()
	local, err := tlsutil.EnsureLocal(t.TempDir(), tlsutil.LocalHosts, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	reloader, err := tlsutil.NewReloader(local.Cert, local.Key)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.LoadX509KeyPair(local.Cert, local.Key)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = tlsutil.ServerConfig(reloader, nil, nil)
	srv.TLS.Certificates = []tls.Certificate{pair} // httptest would add its own otherwise
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv, local.CA
}
