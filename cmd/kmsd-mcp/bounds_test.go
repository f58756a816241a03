package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	neturl "net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/internal/testmetrics"
)

// TestLoadedVersionsBounded (issue 25, part 7, from an outside review:
// every enabled older version a call loaded stayed loaded, most of a GiB
// each at logN 15): besides each key's primary, at most
// --max-loaded-versions versions (2) stay loaded, the least recently used
// dropped; a dropped one loads again when a call needs it, from the
// verified blob cache (nothing downloaded again).
func TestLoadedVersionsBounded(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	for range 3 {
		if _, err := w.adminc.Rotate(context.Background(), "he"); err != nil {
			t.Fatal(err)
		}
	}
	cache := t.TempDir()
	url := w.startHTTP(t, "--key", "he", "--cache-dir", cache)
	s := connectHTTP(t, url, w.token(t, "worker", "he"))
	envs := map[uint64]any{}
	for v := uint64(1); v <= 4; v++ {
		envs[v] = envJSON(w.encrypt(t, w.keysFor(t, "he", v), []float64{1, 2}))
	}
	use := func(v uint64) {
		t.Helper()
		if _, msg := call(t, s, "he_polynomial", map[string]any{"ciphertext": envs[v], "coefficients": []float64{1, 2}}); msg != "" {
			t.Fatalf("version %d: %s", v, msg)
		}
	}
	loaded := func() string {
		t.Helper()
		out, msg := call(t, s, "he_describe", map[string]any{})
		if msg != "" {
			t.Fatal(msg)
		}
		var vs []string
		for _, k := range out["keys"].([]any) {
			for _, v := range k.(map[string]any)["versions"].([]any) {
				vs = append(vs, fmt.Sprint(v.(map[string]any)["version"]))
			}
		}
		return strings.Join(vs, ",")
	}
	use(4)
	use(1)
	use(2)
	use(3)
	if got := loaded(); got != "4,3,2" {
		t.Fatalf("after calls on versions 1, 2, 3: loaded %s, want 4,3,2 (the primary and the 2 most recently used)", got)
	}
	mtimes := map[string]time.Time{}
	ents, _ := os.ReadDir(cache)
	for _, e := range ents {
		fi, _ := e.Info()
		mtimes[e.Name()] = fi.ModTime()
	}
	use(2)
	use(1) // loads again; 3 is now the least recently used
	if got := loaded(); got != "4,2,1" {
		t.Fatalf("after version 1 again: loaded %s, want 4,2,1", got)
	}
	ents, _ = os.ReadDir(cache)
	for _, e := range ents {
		if fi, _ := e.Info(); !fi.ModTime().Equal(mtimes[e.Name()]) {
			t.Errorf("reloading version 1 wrote %s again", e.Name())
		}
	}
	use(3)
	use(4)
	if got := loaded(); got != "4,3,1" {
		t.Fatalf("after versions 3 and 4: loaded %s, want 4,3,1", got)
	}
}

// TestConcurrentCallsLoadOnce: calls that need the same unloaded version
// at once share one load (each loaded its own copy of the keys before:
// most of a GiB each at logN 15, up to --max-calls of them).
func TestConcurrentCallsLoadOnce(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	if _, err := w.adminc.Rotate(context.Background(), "he"); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	maddr := ln.Addr().String()
	ln.Close()
	url := w.startHTTP(t, "--key", "he", "--metrics-addr", maddr, "--max-calls", "8")
	s := connectHTTP(t, url, w.token(t, "worker", "he"))
	e1 := envJSON(w.encrypt(t, w.keysFor(t, "he", 1), []float64{1, 2}))
	var wg sync.WaitGroup
	errs := make(chan string, 6)
	for range 6 {
		wg.Go(func() {
			res, err := s.CallTool(context.Background(), &mcp.CallToolParams{Name: "he_polynomial", Arguments: map[string]any{"ciphertext": e1, "coefficients": []float64{1, 2}}})
			switch {
			case err != nil:
				errs <- err.Error()
			case res.IsError:
				errs <- res.Content[0].(*mcp.TextContent).Text
			}
		})
	}
	wg.Wait()
	close(errs)
	for msg := range errs {
		t.Error(msg)
	}
	m := testmetrics.Get(t, http.DefaultClient, "http://"+maddr+"/metrics", "")
	if n := m.Must(t, "kmsd_mcp_key_fetches_total", "outcome", "ok"); n != 2 {
		t.Errorf("%v key fetches, want 2: the primary at start and version 1 once for 6 calls at once", n)
	}
}

// stallingProxy is a plain-HTTP proxy on 127.0.0.1 in front of kmsd that,
// while stall is set, answers a blob download with its headers and half
// its body, then nothing: the connection stays open (the fault an outside
// review found holding a tool-call slot forever).
type stallingProxy struct {
	url     string
	stall   atomic.Bool
	stalled atomic.Int32  // blob requests stalled
	gone    chan struct{} // a stalled request's client went away
}

func newStallingProxy(t *testing.T, w *world) *stallingProxy {
	p := &stallingProxy{gone: make(chan struct{}, 100)}
	target, _ := neturl.Parse(w.url)
	cfg, err := client.TLSConfig(w.ca, "", "")
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: cfg}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = tr
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if !p.stall.Load() || !strings.HasPrefix(r.URL.Path, "/v1/blobs/") || r.Header.Get("If-None-Match") != "" {
			rp.ServeHTTP(rw, r)
			return
		}
		req, _ := http.NewRequestWithContext(r.Context(), r.Method, w.url+r.URL.Path, nil)
		req.Header = r.Header.Clone()
		resp, err := tr.RoundTrip(req)
		if err != nil {
			http.Error(rw, err.Error(), 502)
			return
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		rw.Header().Set("Content-Length", fmt.Sprint(len(body)))
		rw.WriteHeader(resp.StatusCode)
		rw.Write(body[:len(body)/2])
		rw.(http.Flusher).Flush()
		p.stalled.Add(1)
		select {
		case <-r.Context().Done():
			p.gone <- struct{}{}
		case <-release:
		}
	}))
	t.Cleanup(func() {
		close(release)
		srv.Close()
	})
	p.url = srv.URL
	return p
}

// TestStalledDownloadReleasesTheCall (issue 25, part 7, from an outside
// review: a key download that stopped making progress held a --max-calls
// slot forever): with kmsd's blob answers stalling mid-body, a call that
// needs an older version fails after --download-stall-timeout saying the
// download stalled; a second call waiting for the same load gives up when
// its own context ends and frees its slot (a third call then runs, not
// refused as busy); a load whose last waiting call gave up is cancelled;
// once kmsd answers again the version loads, resuming the download.
func TestStalledDownloadReleasesTheCall(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	if _, err := w.adminc.Rotate(context.Background(), "he"); err != nil {
		t.Fatal(err)
	}
	p := newStallingProxy(t, w)
	url := w.startHTTP(t, "--key", "he", "--kms-url", p.url, "--max-calls", "2", "--download-stall-timeout", "6s")
	s := connectHTTP(t, url, w.token(t, "worker", "he"))
	e1 := envJSON(w.encrypt(t, w.keysFor(t, "he", 1), []float64{1, 2})) // version 1: enabled, not loaded
	e2 := envJSON(w.encrypt(t, w.keysFor(t, "he", 2), []float64{1, 2})) // version 2: the primary, loaded
	poly := func(ctx context.Context, env any) (string, error) {
		res, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "he_polynomial", Arguments: map[string]any{"ciphertext": env, "coefficients": []float64{1, 2}}})
		if err != nil {
			return "", err
		}
		if res.IsError {
			return res.Content[0].(*mcp.TextContent).Text, nil
		}
		return "", nil
	}
	p.stall.Store(true)
	start := time.Now()
	first := make(chan string, 1)
	go func() {
		msg, err := poly(context.Background(), e1)
		if err != nil {
			msg = err.Error()
		}
		first <- msg
	}()
	for p.stalled.Load() == 0 {
		if time.Since(start) > 5*time.Second {
			t.Fatal("the load of version 1 never reached a blob")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The second call waits for the same load, and gives up at 300 ms.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	if _, err := poly(ctx, e1); err == nil {
		t.Fatal("a call waiting for a stalled load returned without error")
	}
	cancel()
	// Its slot is free: a call on the loaded version runs (of the two
	// slots, the stalled first call holds one).
	var msg string
	for {
		if msg, _ = poly(context.Background(), e2); msg == "" {
			break
		}
		if !strings.Contains(msg, "busy") || time.Since(start) > 4*time.Second {
			t.Fatalf("a call on the loaded version while one waits for a stalled load: %q after %s", msg, time.Since(start))
		}
		time.Sleep(50 * time.Millisecond)
	}
	select {
	case msg = <-first:
	case <-time.After(20 * time.Second):
		t.Fatal("the call whose download stalled was still waiting 20 s later")
	}
	if took := time.Since(start); !strings.Contains(msg, "stalled") || !strings.Contains(msg, "no byte from kmsd for 6s") || took < 5*time.Second {
		t.Fatalf("the call whose download stalled: %q after %s", msg, took)
	}
	t.Logf("the call whose download stalled: %q", msg)

	// A load whose only call gives up is cancelled: its request to kmsd
	// ends with the call, not at the stall deadline.
	for len(p.gone) > 0 {
		<-p.gone
	}
	ctx, cancel = context.WithTimeout(context.Background(), 500*time.Millisecond)
	poly(ctx, e1)
	cancel()
	select {
	case <-p.gone:
	case <-time.After(3 * time.Second):
		t.Fatal("the load of version 1 went on after the only call waiting for it gave up")
	}

	// kmsd answers again: version 1 loads (resuming the download).
	p.stall.Store(false)
	if msg, err := poly(context.Background(), e1); msg != "" || err != nil {
		t.Fatalf("version 1 once kmsd answers: %q %v", msg, err)
	}
}
