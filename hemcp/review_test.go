package hemcp

import (
	"crypto/sha256"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
)

// newTestServer is a Server whose kmsd is kmsd, a stand-in answering
// introspections (to inject faults and count questions), configured by
// cfg (Metrics nop unless set).
func newTestServer(t *testing.T, cfg Config, kmsd http.HandlerFunc) *Server {
	t.Helper()
	srv := httptest.NewServer(kmsd)
	t.Cleanup(srv.Close)
	cfg.Client, _ = client.New(srv.URL, "srv")
	if cfg.Metrics == nil {
		cfg.Metrics = nopMetrics{}
	}
	return &Server{cfg: cfg, log: slog.New(slog.DiscardHandler), intro: map[[32]byte]introEntry{}, served: map[string]*servedKey{}}
}

// Regression tests for the outside review of kmsd-mcp's resource server.
// The stand-in kmsd here injects faults (slow answers) and counts
// questions; the real path is tested in cmd/kmsd-mcp.

// TestAddressLimitNotReset: an address over its limit for new tokens
// stays limited however many other addresses send (a full table made
// every bucket new again), and the addresses of one IPv6 /64 share a
// bucket.
func TestAddressLimitNotReset(t *testing.T) {
	var asked atomic.Int32
	s := newTestServer(t, Config{Metrics: nopMetrics{}, IntrospectTTL: time.Minute, MaxRequestBytes: 1 << 20, IntrospectRate: 0.001, IntrospectBurst: 1}, func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"active":false}`))
	})
	h := s.HTTPHandler()
	n := 0
	call := func(remote string) int {
		n++
		req := httptest.NewRequest(http.MethodPost, "/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
		req.RemoteAddr = remote
		req.Header.Set("Authorization", "Bearer "+fmt.Sprintf("kms_%016x_%s", n, strings.Repeat("B", 43)))
		req.Header.Set("Content-Type", "application/json")
		rr := httptest.NewRecorder()
		h.ServeHTTP(rr, req)
		return rr.Code
	}
	const a = "[2001:db8::1]:5000"
	call(a)
	if code := call(a); code != http.StatusTooManyRequests {
		t.Fatalf("over the limit: %d", code)
	}
	if code := call("[2001:db8::2]:5000"); code != http.StatusTooManyRequests {
		t.Fatalf("another address of the same /64: %d", code)
	}
	for i := range maxIntro + 10 {
		call(fmt.Sprintf("10.%d.%d.%d:5000", i>>16&255, i>>8&255, i&255))
	}
	if code := call(a); code != http.StatusTooManyRequests {
		t.Fatalf("an address over its limit was served again after %d other addresses sent: %d", maxIntro+10, code)
	}
	if q := asked.Load(); q > int32(maxIntro+2) {
		t.Fatalf("kmsd asked %d times for %d addresses of one token each, plus the overflow's", q, maxIntro)
	}
}

// TestSlowIntrospectionNotUsed: an answer from kmsd that came later than
// --introspect-ttl after it was asked is used by no request (503) and not
// kept; one within it is kept from when it was asked, so a revocation is
// seen within the bound however slowly kmsd answered.
func TestSlowIntrospectionNotUsed(t *testing.T) {
	var delay atomic.Int64
	var asked atomic.Int32
	s := newTestServer(t, Config{Metrics: nopMetrics{}, IntrospectTTL: 300 * time.Millisecond, MaxRequestBytes: 1 << 20, AllowUnbound: true}, func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		time.Sleep(time.Duration(delay.Load()))
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"active":true,"token_id":"00000000000000aa","role":"worker","keys":["*"]}`))
	})
	tok := "kms_00000000000000aa_" + strings.Repeat("G", 43)
	delay.Store(int64(400 * time.Millisecond))
	if _, err := s.verify(t.Context(), tok, nil); err != errSlowIntrospection {
		t.Fatalf("an answer 400ms late with a 300ms ttl: %v", err)
	}
	if s.knownToken(tok) {
		t.Fatal("a late answer was kept")
	}
	delay.Store(int64(100 * time.Millisecond))
	before := time.Now()
	if _, err := s.verify(t.Context(), tok, nil); err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256([]byte(tok))
	s.introMu.Lock()
	e := s.intro[h]
	s.introMu.Unlock()
	if e.at.After(before.Add(50 * time.Millisecond)) {
		t.Fatalf("the answer is kept from %v, after the question (%v)", e.at.Sub(before), before)
	}
}

// TestKeysNamedExact: the keys a message names are read as the SDK reads
// them, member names exact; a member named twice is refused.
func TestKeysNamedExact(t *testing.T) {
	env := `{"key":"he2","version":1}`
	call := func(args string) string {
		return `"params":{"name":"he_polynomial","arguments":{` + args + `,"coefficients":[0,1]}}`
	}
	for name, c := range map[string]struct {
		body string
		want []string
		ok   bool
	}{
		"plain":                      {`{"jsonrpc":"2.0","id":1,"method":"tools/call",` + call(`"ciphertext":`+env) + `}`, []string{"he2"}, true},
		"a second member Method":     {`{"jsonrpc":"2.0","id":2,"method":"tools/call",` + call(`"ciphertext":`+env) + `,"Method":"ping"}`, []string{"he2"}, true},
		"a second member Params":     {`{"jsonrpc":"2.0","id":3,"method":"tools/call",` + call(`"ciphertext":`+env) + `,"Params":{"arguments":{"ciphertext":{"key":"he"}}}}`, []string{"he2"}, true},
		"a Kelvin sign key":          {`{"jsonrpc":"2.0","id":4,"method":"tools/call",` + call(`"ciphertext":{"key":"he2","`+"\u212a"+`ey":"he"}`) + `}`, []string{"he2"}, true},
		"a second member Ciphertext": {`{"jsonrpc":"2.0","id":5,"method":"tools/call",` + call(`"ciphertext":`+env+`,"Ciphertext":{"key":"he"}`) + `}`, []string{"he2"}, true},
		"method twice":               {`{"jsonrpc":"2.0","id":6,"method":"ping","method":"tools/call",` + call(`"ciphertext":`+env) + `}`, nil, false},
		"key twice":                  {`{"jsonrpc":"2.0","id":7,"method":"tools/call",` + call(`"ciphertext":{"key":"he2","key":"he"}`) + `}`, nil, false},
		"a batch":                    {`[{"jsonrpc":"2.0","id":8,"method":"tools/call",` + call(`"ciphertexts":[{"key":"he"},{"key":"he2"}]`) + `}]`, []string{"he", "he2"}, true},
		"a manifest":                 {`{"jsonrpc":"2.0","id":9,"method":"resources/read","params":{"uri":"kmsd://keys/he2/manifest"}}`, []string{"he2"}, true},
	} {
		got, ok := keysNamed([]byte(c.body))
		if ok != c.ok || !slices.Equal(got, c.want) {
			t.Errorf("%s: %v %v, want %v %v", name, got, ok, c.want, c.ok)
		}
	}
}
