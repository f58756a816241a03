package hemcp

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
)

type countMetrics struct {
	mu               sync.Mutex
	hit, miss, calls int
}

func (c *countMetrics) ToolCall(string, string, time.Duration) {}
func (c *countMetrics) KeyFetch(time.Duration, error)          {}
func (c *countMetrics) Introspection(cached bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cached {
		c.hit++
	} else {
		c.miss++
	}
}

// TestIntrospectionCountedOnce: one /mcp request with an uncached token
// asks kmsd once and counts one introspection, a miss (the review found
// it counted twice, miss and hit: HTTPHandler's check and the SDK's
// each called verify). The stand-in for kmsd answers introspections only.
func TestIntrospectionCountedOnce(t *testing.T) {
	asked := 0
	kmsd := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked++
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"active":true,"role":"worker","keys":["*"],"token_id":"t1"}`))
	}))
	defer kmsd.Close()
	kc, _ := client.New(kmsd.URL, "srv")
	m := &countMetrics{}
	s := &Server{cfg: Config{Client: kc, Metrics: m, IntrospectTTL: time.Minute, MaxRequestBytes: 1 << 20}, log: slog.New(slog.DiscardHandler), intro: map[[32]byte]introEntry{}, served: map[string]*servedKey{}}
	h := s.HTTPHandler()
	req := httptest.NewRequest(http.MethodPost, "/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
	req.Header.Set("Authorization", "Bearer client-token")
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	rr := httptest.NewRecorder()
	h.ServeHTTP(rr, req)
	t.Logf("status %d; kmsd asked %d times; metrics: miss=%d hit=%d", rr.Code, asked, m.miss, m.hit)
	if m.miss != 1 || m.hit != 0 || asked != 1 {
		t.Errorf("one request counted as %d introspections (miss %d, hit %d)", m.miss+m.hit, m.miss, m.hit)
	}
}
