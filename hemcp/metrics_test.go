package hemcp

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
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
	m := &countMetrics{}
	s := newTestServer(t, Config{Metrics: m, IntrospectTTL: time.Minute, MaxRequestBytes: 1 << 20}, func(w http.ResponseWriter, r *http.Request) {
		asked++
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"active":true,"role":"worker","keys":["*"],"token_id":"t1"}`))
	})
	h := s.HTTPHandler()
	req := httptest.NewRequest(http.MethodPost, "/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
	req.Header.Set("Authorization", "Bearer kms_0123456789abcdef_"+strings.Repeat("c", 43))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	rr := httptest.NewRecorder()
	h.ServeHTTP(rr, req)
	t.Logf("status %d; kmsd asked %d times; metrics: miss=%d hit=%d", rr.Code, asked, m.miss, m.hit)
	if m.miss != 1 || m.hit != 0 || asked != 1 {
		t.Errorf("one request counted as %d introspections (miss %d, hit %d)", m.miss+m.hit, m.miss, m.hit)
	}
}

// TestIntrospectionBounds (issue 25, from an outside review: every bogus
// token cost one introspection at kmsd, 400 in 3.6 s, and at 4096
// answers the whole cache was cleared): a token not of kmsd's shape is
// refused without asking kmsd; requests presenting one new token at once
// ask kmsd once; a full cache drops its oldest answer, not all of them.
func TestIntrospectionBounds(t *testing.T) {
	var asked atomic.Int32
	s := newTestServer(t, Config{Metrics: nopMetrics{}, IntrospectTTL: time.Minute, MaxRequestBytes: 1 << 20}, func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		time.Sleep(100 * time.Millisecond) // so that the concurrent requests overlap
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"active":false}`))
	})
	h := s.HTTPHandler()
	call := func(tok string) int {
		req := httptest.NewRequest(http.MethodPost, "/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Content-Type", "application/json")
		rr := httptest.NewRecorder()
		h.ServeHTTP(rr, req)
		return rr.Code
	}
	for _, bogus := range []string{"garbage", "kms_x", "kms_0123456789abcdef_short", "kms_0123456789ABCDEF_" + strings.Repeat("a", 43), "kms_0123456789abcdef_" + strings.Repeat("a", 42) + "="} {
		if code := call(bogus); code != http.StatusUnauthorized {
			t.Errorf("%q: %d", bogus, code)
		}
	}
	if n := asked.Load(); n != 0 {
		t.Fatalf("kmsd was asked %d times about tokens not of its shape", n)
	}
	tok := "kms_0123456789abcdef_" + strings.Repeat("A", 43)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if code := call(tok); code != http.StatusUnauthorized {
				t.Errorf("an inactive token: %d", code)
			}
		})
	}
	wg.Wait()
	if n := asked.Load(); n != 1 {
		t.Fatalf("8 requests with one new token asked kmsd %d times, want 1", n)
	}
	// A full cache keeps the answers it has but its oldest.
	s.intro = map[[32]byte]introEntry{}
	first := [32]byte{1}
	s.remember(first, &client.Introspection{}, time.Now())
	for i := range maxIntro - 1 {
		s.remember([32]byte{2, byte(i), byte(i >> 8)}, &client.Introspection{}, time.Now())
	}
	hot := [32]byte{3}
	s.remember(hot, &client.Introspection{}, time.Now())
	if _, ok := s.intro[hot]; !ok || len(s.intro) != maxIntro {
		t.Fatalf("after %d answers the cache holds %d, the newest: %v", maxIntro+1, len(s.intro), ok)
	}
	if _, ok := s.intro[first]; ok {
		t.Fatal("the oldest answer was kept past the bound")
	}
	if _, ok := s.intro[[32]byte{2, 5, 0}]; !ok {
		t.Fatal("a full cache dropped more than its oldest answer")
	}
}

// TestNewTokensLimitedPerAddress (from an outside review: each
// well-formed bogus token sent to kmsd-mcp cost an introspection and an
// audit record at kmsd, from anyone): past the burst, an address's
// requests with tokens not in the cache get 429 without kmsd being
// asked; another address is served; a token in the cache is not limited.
func TestNewTokensLimitedPerAddress(t *testing.T) {
	var asked atomic.Int32
	s := newTestServer(t, Config{Metrics: nopMetrics{}, IntrospectTTL: time.Minute, MaxRequestBytes: 1 << 20, IntrospectRate: 1, IntrospectBurst: 5}, func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"active":false}`))
	})
	h := s.HTTPHandler()
	call := func(tok, remote string) int {
		req := httptest.NewRequest(http.MethodPost, "/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
		req.RemoteAddr = remote
		req.Header.Set("Authorization", "bearer "+tok) // the scheme is case-insensitive
		req.Header.Set("Content-Type", "application/json")
		rr := httptest.NewRecorder()
		h.ServeHTTP(rr, req)
		return rr.Code
	}
	codes := map[int]int{}
	first := ""
	for i := range 20 {
		tok := fmt.Sprintf("kms_%016x_%s", i, strings.Repeat("B", 43))
		if i == 0 {
			first = tok
		}
		codes[call(tok, "192.0.2.1:5000")]++
	}
	if codes[http.StatusUnauthorized] != 5 || codes[http.StatusTooManyRequests] != 15 || asked.Load() != 5 {
		t.Fatalf("20 new tokens from one address: %v, kmsd asked %d times; want 5 answered, 15 refused", codes, asked.Load())
	}
	if code := call(first, "192.0.2.1:5001"); code != http.StatusUnauthorized {
		t.Errorf("a token in the cache, from a limited address: %d", code)
	}
	if code := call(fmt.Sprintf("kms_%016x_%s", 99, strings.Repeat("B", 43)), "198.51.100.7:5000"); code != http.StatusUnauthorized {
		t.Errorf("another address: %d", code)
	}
}

// TestKnownTokenNotLimited: a client whose token kmsd said is active is
// asked about again when the answer ages out, without counting against
// its address's limit for new tokens (the limit is for tokens nobody
// vouched for; before, a busy client behind a proxy got 429s).
func TestKnownTokenNotLimited(t *testing.T) {
	good := "kms_00000000000000aa_" + strings.Repeat("G", 43)
	var asked atomic.Int32
	s := newTestServer(t, Config{Metrics: nopMetrics{}, IntrospectTTL: 200 * time.Millisecond, MaxRequestBytes: 1 << 20, IntrospectRate: 0.001, IntrospectBurst: 2, AllowUnbound: true}, func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		w.Header().Set("Content-Type", "application/json")
		body, _ := io.ReadAll(r.Body)
		if strings.Contains(string(body), good) {
			w.Write([]byte(`{"active":true,"token_id":"00000000000000aa","role":"worker","keys":["*"]}`))
			return
		}
		w.Write([]byte(`{"active":false}`))
	})
	h := s.HTTPHandler()
	call := func(tok string) int {
		req := httptest.NewRequest(http.MethodPost, "/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
		req.RemoteAddr = "192.0.2.1:5000"
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		rr := httptest.NewRecorder()
		h.ServeHTTP(rr, req)
		return rr.Code
	}
	if code := call(good); code == http.StatusUnauthorized || code == http.StatusTooManyRequests {
		t.Fatalf("an active token: %d", code)
	}
	if code := call("kms_00000000000000bb_" + strings.Repeat("B", 43)); code != http.StatusUnauthorized {
		t.Fatalf("a bogus token: %d", code)
	}
	if code := call("kms_00000000000000cc_" + strings.Repeat("B", 43)); code != http.StatusTooManyRequests {
		t.Fatalf("a new token past the limit: %d", code)
	}
	before := asked.Load()
	for range 5 {
		time.Sleep(210 * time.Millisecond) // the answer ages out (a ttl that an answer under -race fits in)
		if code := call(good); code == http.StatusTooManyRequests || code == http.StatusUnauthorized {
			t.Fatalf("the active token, its answer aged out, from the limited address: %d", code)
		}
	}
	if n := asked.Load() - before; n != 5 {
		t.Fatalf("kmsd asked %d times about the aged-out token, want 5 (each answer had aged out)", n)
	}
}
