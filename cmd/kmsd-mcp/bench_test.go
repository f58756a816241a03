package main

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/hemcp"
	"github.com/kmsd-project/kmsd/internal/tlsutil"
)

// benchWorld is kmsd with a ckks-logn14 key (rotations: powers of two),
// kmsd-mcp on streamable HTTP, a connected client, and the same key's
// engine in this process for the comparison.
type benchWorld struct {
	call   func(tool string, args map[string]any)
	eng    *hemcp.Engine
	x      *rlwe.Ciphertext
	xJSON  map[string]any
	W      [][]float64
	corpus corpusJSON
}

func decodeB64(b testing.TB, s string) []byte {
	out, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		b.Fatal(err)
	}
	return out
}

func newBenchWorld(b *testing.B) *benchWorld {
	w := newWorld(b)
	w.heKey(b, "he", "ckks-logn14", 1<<13)
	rng := rand.New(rand.NewPCG(3, 4))
	bw := &benchWorld{corpus: hemcpCorpus(rng, 1000, 128)}
	ctxFile := filepath.Join(b.TempDir(), "context.json")
	data, _ := json.Marshal(map[string]any{"docs": bw.corpus})
	os.WriteFile(ctxFile, data, 0o600)
	url := w.startHTTP(b, "--key", "he", "--context", ctxFile)
	s := connectHTTP(b, url, w.token(b, "worker", "he"))
	bw.call = func(tool string, args map[string]any) {
		res, err := s.CallTool(context.Background(), &mcp.CallToolParams{Name: tool, Arguments: args})
		if err != nil || res.IsError || res.StructuredContent == nil {
			b.Fatalf("%s: %v %+v", tool, err, res)
		}
	}
	keys := w.keysFor(b, "he", 1)
	// The in-process side: the same version's evaluation keys, fetched and
	// verified the same way kmsd-mcp does.
	pub, _ := os.ReadFile(w.identityFile)
	f := &hekeys.Fetcher{BaseURL: w.url, Token: w.admin, IdentityKey: decodeB64(b, string(pub)), CacheDir: b.TempDir(), HTTP: w.adminc.HTTPClient()}
	full, err := f.Fetch(context.Background(), "he", 1)
	if err != nil {
		b.Fatal(err)
	}
	if bw.eng, err = hemcp.NewEngine(full); err != nil {
		b.Fatal(err)
	}
	x := make([]float64, 128)
	for i := range x {
		x[i] = rng.Float64()*2 - 1
	}
	env := w.encrypt(b, keys, x)
	bw.xJSON = envJSON(env)
	if bw.x, err = full.Open(env); err != nil {
		b.Fatal(err)
	}
	bw.W = make([][]float64, 8)
	for i := range bw.W {
		bw.W[i] = make([]float64, 128)
		for j := range bw.W[i] {
			bw.W[i][j] = rng.Float64()*2 - 1
		}
	}
	return bw
}

// BenchmarkLinear128: he_linear with 128 features and 8 outputs at
// ckks-logn14, through MCP over streamable HTTP and in process.
func BenchmarkLinear128(b *testing.B) {
	bw := newBenchWorld(b)
	b.Run("mcp-http", func(b *testing.B) {
		for b.Loop() {
			bw.call("he_linear", map[string]any{"ciphertext": bw.xJSON, "weights": bw.W})
		}
	})
	b.Run("in-process", func(b *testing.B) {
		for b.Loop() {
			y, _, err := bw.eng.Linear(context.Background(), bw.x, bw.W, nil)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := bw.eng.Keys.Seal(y, len(bw.W)); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkSimilarity1000x128: he_similarity of a 128-dimension query
// against 1,000 context embeddings at ckks-logn14, through MCP over
// streamable HTTP and in process.
func BenchmarkSimilarity1000x128(b *testing.B) {
	bw := newBenchWorld(b)
	b.Run("mcp-http", func(b *testing.B) {
		for b.Loop() {
			bw.call("he_similarity", map[string]any{"ciphertext": bw.xJSON, "context": "docs"})
		}
	})
	b.Run("in-process", func(b *testing.B) {
		for b.Loop() {
			y, _, err := bw.eng.MatVec(context.Background(), bw.x, bw.corpus.Embeddings)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := bw.eng.Keys.Seal(y, len(bw.corpus.Embeddings)); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkToolCallTransport: the cost of a tool call's transport and
// authorization, with he_describe (no evaluation) and a degree-2
// he_polynomial at ckks-logn13: over loopback HTTP with a plain token (as
// before kmsd-mcp served TLS), over HTTPS (TLS 1.3, X25519MLKEM768) with an
// audience-bound access token from kmsd's token endpoint and its
// introspection cached (--introspect-ttl 10s), and the same with every
// call introspected at kmsd (--introspect-ttl 1ns: the cache never
// answers).
func BenchmarkToolCallTransport(b *testing.B) {
	w := newWorld(b)
	w.heKey(b, "he", "ckks-logn13", 1<<12)
	keys := w.keysFor(b, "he", 1)
	x := envJSON(w.encrypt(b, keys, []float64{0.5, -0.25, 1}))
	local, err := tlsutil.EnsureLocal(filepath.Join(b.TempDir(), "tls"), []string{"127.0.0.1"}, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	pool, err := tlsutil.LoadPool(local.CA)
	if err != nil {
		b.Fatal(err)
	}
	httpsClient := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	plain := w.startHTTP(b, "--key", "he")
	startTLS := func(ttl string) (string, string) {
		u := strings.Replace(w.startHTTP(b, "--key", "he", "--tls-cert", local.Cert, "--tls-key", local.Key, "--allow-unbound-tokens=false", "--introspect-ttl", ttl), "http://", "https://", 1)
		cl, err := w.adminc.CreateToken(context.Background(), client.CreateTokenRequest{Role: "worker", Keys: []string{"he"}, TTL: "1h"})
		if err != nil {
			b.Fatal(err)
		}
		st, out := w.accessToken(b, cl.ID, cl.Token, u, "")
		if st != 200 {
			b.Fatalf("access token: %d %v", st, out)
		}
		return u, out["access_token"].(string)
	}
	cachedURL, cachedTok := startTLS("10s")
	uncachedURL, uncachedTok := startTLS("1ns")
	for _, v := range []struct {
		name, url, token string
		rt               http.RoundTripper
	}{
		{"http-loopback", plain, w.token(b, "worker", "he"), http.DefaultTransport},
		{"https-bound-cached", cachedURL, cachedTok, httpsClient},
		{"https-bound-uncached", uncachedURL, uncachedTok, httpsClient},
	} {
		c := mcp.NewClient(&mcp.Implementation{Name: "bench", Version: "1"}, nil)
		s, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: v.url, HTTPClient: &http.Client{Transport: bearer{v.token, v.rt}}}, nil)
		if err != nil {
			b.Fatalf("%s: connect: %v", v.name, err)
		}
		for _, tc := range []struct {
			tool string
			args map[string]any
		}{{"he_describe", map[string]any{}}, {"he_polynomial", map[string]any{"ciphertext": x, "coefficients": []float64{0, 1, 1}}}} {
			b.Run(tc.tool+"/"+v.name, func(b *testing.B) {
				for b.Loop() {
					res, err := s.CallTool(context.Background(), &mcp.CallToolParams{Name: tc.tool, Arguments: tc.args})
					if err != nil || res.IsError {
						b.Fatalf("%v %+v", err, res)
					}
				}
			})
		}
		s.Close()
	}
}

// heapLive is the heap the last collection found live (runtime/metrics:
// read without stopping the world).
func heapLive() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// procKiB is a field of /proc/self/status (VmRSS, VmHWM), in KiB.
func procKiB(b *testing.B, field string) uint64 {
	st, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(st), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			var n uint64
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &n)
			return n
		}
	}
	b.Fatalf("no %s in /proc/self/status", field)
	return 0
}

// measured runs f and reports, per call, the bytes this process (client,
// kmsd-mcp and kmsd) allocated, the most heap a collection during the
// calls found live above what was live before, and how far the resident
// set grew above what it was before (Linux: the peak is reset through
// /proc/self/clear_refs).
func measured(b *testing.B, f func()) {
	runtime.GC()
	debug.FreeOSMemory()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	base := heapLive()
	rss := procKiB(b, "VmRSS")
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		b.Fatal(err)
	}
	var peak atomic.Uint64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if h := heapLive(); h > peak.Load() {
				peak.Store(h)
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	b.ResetTimer()
	for b.Loop() {
		f()
	}
	b.StopTimer()
	close(stop)
	<-done
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(after.TotalAlloc-before.TotalAlloc)/float64(b.N)/(1<<20), "MiB-alloc/op")
	b.ReportMetric(float64(max(peak.Load(), base)-base)/(1<<20), "MiB-live-peak")
	b.ReportMetric(float64(max(procKiB(b, "VmHWM"), rss)-rss)/1024, "MiB-RSS-peak")
}

// BenchmarkWorstAcceptedCall (issue 25, part 7): the costliest call each
// cap lets through, per preset: he_linear with as many columns as
// MatrixWork allows (one plaintext product each) and as many rows as
// WeightsPerSlot·slots values then allow, he_polynomial of the degree the
// levels allow, and
// he_aggregate of 64 level-0 ciphertexts (or as many as fit the default
// 16 MiB message). And, at ckks-logn13 with --max-request-mib 64, a call
// like the outside review's 33 MiB he_linear (4,096 x 4,096 weights, all
// 1), now refused.
func BenchmarkWorstAcceptedCall(b *testing.B) {
	for _, p := range []struct {
		preset       string
		slots, level int
		ctBytes      int // a level-0 ciphertext, base64
	}{{"ckks-logn13", 1 << 12, 2, 175 << 10}, {"ckks-logn14", 1 << 13, 4, 350 << 10}, {"ckks-logn15", 1 << 14, 11, 700 << 10}} {
		b.Run(p.preset, func(b *testing.B) {
			w := newWorld(b)
			w.heKey(b, "he", p.preset, p.slots)
			extra := []string{"--key", "he"}
			if p.preset == "ckks-logn13" {
				extra = append(extra, "--max-request-mib", "64")
			}
			s := connectHTTP(b, w.startHTTP(b, extra...), w.token(b, "worker", "he"))
			call := func(tool string, args any, wantErr string) {
				res, err := s.CallTool(context.Background(), &mcp.CallToolParams{Name: tool, Arguments: args})
				if err != nil {
					b.Fatalf("%s: %v", tool, err)
				}
				msg := ""
				if res.IsError {
					msg = res.Content[0].(*mcp.TextContent).Text
				}
				if wantErr == "" && msg != "" || wantErr != "" && !strings.Contains(msg, wantErr) {
					b.Fatalf("%s: %q, want %q", tool, msg, wantErr)
				}
			}
			keys := w.keysFor(b, "he", 1)
			rng := rand.New(rand.NewPCG(5, 6))
			x := make([]float64, p.slots)
			for i := range x {
				x[i] = rng.Float64()*2 - 1
			}
			xJSON := envJSON(w.encrypt(b, keys, x))
			cols := hemcp.MatrixWork / p.slots
			rows := hemcp.WeightsPerSlot * p.slots / cols
			b.Run(fmt.Sprintf("he_linear-%dx%d", rows, cols), func(b *testing.B) {
				W := make([][]float64, rows)
				for i := range W {
					W[i] = make([]float64, cols)
					for j := range W[i] {
						// Three decimals: at ckks-logn15 the ciphertext
						// alone is 8.4 MiB of the message's 16.
						W[i][j] = math.Round((rng.Float64()*2-1)*1000) / 1000
					}
				}
				args, _ := json.Marshal(map[string]any{"ciphertext": envJSON(w.encrypt(b, keys, x[:cols])), "weights": W})
				b.Logf("%.1f MiB of arguments", float64(len(args))/(1<<20))
				measured(b, func() { call("he_linear", json.RawMessage(args), "") })
			})
			b.Run(fmt.Sprintf("he_polynomial-degree%d", p.level), func(b *testing.B) {
				c := make([]float64, p.level+1)
				c[0], c[1] = 0.1, 1
				for k := 2; k < len(c); k++ {
					c[k] = 1e-4
				}
				measured(b, func() { call("he_polynomial", map[string]any{"ciphertext": xJSON, "coefficients": c}, "") })
			})
			n := min(hemcp.MaxAggregateInputs, (15<<20)/p.ctBytes)
			b.Run(fmt.Sprintf("he_aggregate-%d-level0", n), func(b *testing.B) {
				ct, err := keys.Open(w.encrypt(b, keys, x))
				if err != nil {
					b.Fatal(err)
				}
				ckks.NewEvaluator(keys.CKKS, nil).DropLevel(ct, ct.Level())
				env, err := keys.Seal(ct, p.slots)
				if err != nil {
					b.Fatal(err)
				}
				w.attest(b, env)
				cts := make([]any, n)
				for i := range cts {
					cts[i] = envJSON(env)
				}
				measured(b, func() { call("he_aggregate", map[string]any{"ciphertexts": cts, "op": "sum"}, "") })
			})
			if p.preset == "ckks-logn13" {
				b.Run("refused-he_linear-4096x4096", func(b *testing.B) {
					args := rawArgs(b, xJSON, map[string][]byte{"weights": digits(4096, 4096, '1')})
					b.Logf("%d MiB of arguments", len(args)>>20)
					measured(b, func() { call("he_linear", args, "4096 columns; the cap is 512") })
				})
			}
		})
	}
}

// BenchmarkFetchKeyset: the SDK fetching a whole keyset (public,
// relinearization and a Galois key per power of two) into an empty cache
// from kmsd over HTTPS on loopback and loading it, stored full or seeded
// (--he-key-form): download, digest checks, and either Lattigo's decoding
// or the expansion and its check against the full form's digest.
func BenchmarkFetchKeyset(b *testing.B) {
	for _, preset := range []struct {
		name  string
		slots int
	}{{"ckks-logn13", 1 << 12}, {"ckks-logn14", 1 << 13}, {"ckks-logn15", 1 << 14}} {
		for _, form := range []string{"full", "seeded"} {
			b.Run(preset.name+"/"+form, func(b *testing.B) {
				w := newWorldWith(b, form == "full")
				w.heKey(b, "he", preset.name, preset.slots)
				pub, _ := os.ReadFile(w.identityFile)
				var bytes int64
				for b.Loop() {
					f := &hekeys.Fetcher{BaseURL: w.url, Token: w.admin, IdentityKey: decodeB64(b, string(pub)), CacheDir: b.TempDir(), HTTP: w.adminc.HTTPClient()}
					k, err := f.Fetch(context.Background(), "he", 1)
					if err != nil {
						b.Fatal(err)
					}
					bytes = 0
					for _, r := range k.Manifest.Blobs() {
						bytes += r.Size
					}
				}
				b.ReportMetric(float64(bytes)/(1<<20), "MiB-fetched")
			})
		}
	}
}
