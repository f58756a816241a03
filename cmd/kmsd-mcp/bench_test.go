package main

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/tuneinsight/lattigo/v6/core/rlwe"

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
			y, _, err := bw.eng.Linear(bw.x, bw.W, nil)
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
			y, _, err := bw.eng.MatVec(bw.x, bw.corpus.Embeddings)
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
