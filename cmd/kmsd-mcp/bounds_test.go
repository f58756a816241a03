package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

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
