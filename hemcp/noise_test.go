package hemcp

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/modelcontextprotocol/go-sdk/auth"
	"log/slog"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/kms"
)

// noiseLog2 is log2 of the largest coefficient of ct's error: its
// decryption minus the encoding of want (every slot) at its scale and
// level.
func noiseLog2(t testing.TB, params ckks.Parameters, sk *rlwe.SecretKey, ct *rlwe.Ciphertext, want []float64) float64 {
	t.Helper()
	pt := rlwe.NewDecryptor(params, sk).DecryptNew(ct)
	exp := ckks.NewPlaintext(params, pt.Level())
	exp.Scale = pt.Scale
	if err := ckks.NewEncoder(params).Encode(want, exp); err != nil {
		t.Fatal(err)
	}
	r := params.RingQ().AtLevel(pt.Level())
	r.Sub(pt.Value, exp.Value, pt.Value)
	r.INTT(pt.Value, pt.Value)
	q0 := params.Q()[0]
	m := 0.0
	for _, c := range pt.Value.Coeffs[0] {
		x := float64(c)
		if c > q0/2 {
			x = -float64(q0 - c)
		}
		m = math.Max(m, math.Abs(x))
	}
	return math.Log2(m)
}

// manifestFor is a manifest that names the parameters of a preset, as
// kmsd's he.Kind reads it.
func manifestFor(t testing.TB, preset string) []byte {
	t.Helper()
	p, err := he.Resolve(he.CKKS, json.RawMessage(`"`+preset+`"`))
	if err != nil {
		t.Fatal(err)
	}
	lit, _ := json.Marshal(string(p.JSON))
	b, err := json.Marshal(kms.Manifest{Key: "k", Version: 1, Kind: "ckks", ParamsID: p.ID, Params: lit, GaloisKeys: []kms.GaloisRef{}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func ckksKind() *he.Kind {
	for _, k := range he.Kinds(nil, 1, false) {
		if k.Name() == "ckks" {
			return k.(*he.Kind)
		}
	}
	panic("no ckks kind")
}

// TestNoiseBoundHolds: for every operation of the tools, on honest fresh
// encryptions, the noise of the result (measured with the secret key) is
// within the bound kmsd attests from the operation's declared cost, and the
// bound is not loose by more than 10 bits (the flooding, and so the
// precision lost, follows it). Decryption's protection rests on this.
func TestNoiseBoundHolds(t *testing.T) {
	for _, preset := range []string{"ckks-logn13", "ckks-logn14"} {
		t.Run(preset, func(t *testing.T) {
			k, sk := localKeys(t, preset, powersOfTwo(1<<(13-1)))
			if preset == "ckks-logn14" {
				k, sk = localKeys(t, preset, powersOfTwo(1<<(14-1)))
			}
			params := k.CKKS
			e, err := NewEngine(k)
			if err != nil {
				t.Fatal(err)
			}
			kind := ckksKind()
			man := manifestFor(t, preset)
			slots := params.MaxSlots()
			rng := rand.New(rand.NewPCG(3, 4))
			x := make([]float64, 100)
			for i := range x {
				x[i] = rng.Float64()*2 - 1
			}
			full := func(v []float64, rest float64) []float64 {
				out := make([]float64, slots)
				for i := range out {
					out[i] = rest
				}
				copy(out, v)
				return out
			}
			ct := encrypt(t, k, x)
			fresh, err := kind.NoiseBound(man, ct.Level(), nil, 0, 0)
			if err != nil {
				t.Fatal(err)
			}
			check := func(name string, got *rlwe.Ciphertext, want []float64, in []float64, cost Cost) {
				t.Helper()
				bound, err := kind.NoiseBound(man, got.Level(), in, cost.Amplification, cost.KeySwitches)
				if err != nil {
					t.Fatal(err)
				}
				m := noiseLog2(t, params, sk, got, want)
				t.Logf("%s: noise 2^%.1f, bound 2^%.1f (amplification %.1f, %d key switches)", name, m, bound, cost.Amplification, cost.KeySwitches)
				if m > bound {
					t.Errorf("%s: noise 2^%.1f above the attested bound 2^%.1f", name, m, bound)
				}
				if bound-m > 10 {
					t.Errorf("%s: bound 2^%.1f is loose by more than 10 bits over the noise 2^%.1f", name, bound, m)
				}
			}
			check("fresh", ct, full(x, 0), nil, Cost{})
			// fresh is checked as an evaluation's input bound below; as
			// a bound of its own:
			if m := noiseLog2(t, params, sk, ct, full(x, 0)); m > fresh {
				t.Fatalf("fresh noise 2^%.1f above its bound 2^%.1f", m, fresh)
			}
			for _, scale := range []float64{1, 4} {
				W := make([][]float64, 7)
				b := make([]float64, 7)
				want := make([]float64, len(W))
				for i := range W {
					W[i] = make([]float64, len(x))
					for j := range W[i] {
						W[i][j] = (rng.Float64()*2 - 1) * scale
						want[i] += W[i][j] * x[j]
					}
					b[i] = rng.Float64()
					want[i] += b[i]
				}
				y, cost, err := e.Linear(context.Background(), ct, W, b)
				if err != nil {
					t.Fatal(err)
				}
				check(fmt.Sprintf("linear x%g", scale), y, full(want, 0), []float64{fresh}, cost)
			}
			c := []float64{0.5, 0.197, -0.05}
			want := make([]float64, len(x))
			for i, v := range x {
				want[i] = c[0] + c[1]*v + c[2]*v*v
			}
			p, cost, err := e.Polynomial(ct, c)
			if err != nil {
				t.Fatal(err)
			}
			check("polynomial", p, full(want, c[0]), []float64{fresh}, cost)
			var cts []*rlwe.Ciphertext
			var ins []float64
			sum := make([]float64, len(x))
			for range 8 {
				v := make([]float64, len(x))
				for i := range v {
					v[i] = rng.Float64()*2 - 1
					sum[i] += v[i]
				}
				cts = append(cts, encrypt(t, k, v))
				ins = append(ins, fresh)
			}
			s, cost, err := e.Aggregate(cts, false)
			if err != nil {
				t.Fatal(err)
			}
			check("sum of 8", s, full(sum, 0), ins, cost)
			mean := make([]float64, len(sum))
			for i := range sum {
				mean[i] = sum[i] / 8
			}
			mn, cost, err := e.Aggregate(cts, true)
			if err != nil {
				t.Fatal(err)
			}
			check("mean of 8", mn, full(mean, 0), ins, cost)
		})
	}
}

// TestToolPanicIsAnError: a panic in a tool is a tool error, not the end
// of the server (the MCP SDK does not recover handlers).
func TestToolPanicIsAnError(t *testing.T) {
	h := safe(&Server{log: slog.New(slog.DiscardHandler), cfg: Config{Metrics: nopMetrics{}}}, "test", func(context.Context, *mcp.CallToolRequest, struct{}) (*mcp.CallToolResult, struct{}, error) {
		var s []int
		_ = s[1<<uint(-1+len(s))]
		return nil, struct{}{}, nil
	})
	if _, _, err := h(context.Background(), nil, struct{}{}); err == nil || !strings.Contains(err.Error(), "internal error") {
		t.Fatalf("a panicking tool: %v", err)
	}
}

// TestCallsBounded (issue 25, from an outside review: concurrent tool
// calls were unbounded, and one large call took 1.3 GB): past MaxCalls
// evaluations at once a call is refused as busy at once, and the slot is
// free again when a call ends; he_describe, which evaluates nothing, is
// not counted.
func TestCallsBounded(t *testing.T) {
	s := &Server{log: slog.New(slog.DiscardHandler), cfg: Config{Metrics: nopMetrics{}}, calls: make(chan struct{}, 1)}
	release := make(chan struct{})
	running := make(chan struct{})
	slow := safe(s, "he_linear", func(context.Context, *mcp.CallToolRequest, struct{}) (*mcp.CallToolResult, struct{}, error) {
		close(running)
		<-release
		return nil, struct{}{}, nil
	})
	quick := safe(s, "he_polynomial", func(context.Context, *mcp.CallToolRequest, struct{}) (*mcp.CallToolResult, struct{}, error) {
		return nil, struct{}{}, nil
	})
	describe := safe(s, "he_describe", func(context.Context, *mcp.CallToolRequest, struct{}) (*mcp.CallToolResult, struct{}, error) {
		return nil, struct{}{}, nil
	})
	done := make(chan error)
	go func() { _, _, err := slow(context.Background(), nil, struct{}{}); done <- err }()
	<-running
	if _, _, err := quick(context.Background(), nil, struct{}{}); err == nil || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("a call past the bound: %v", err)
	}
	if _, _, err := describe(context.Background(), nil, struct{}{}); err != nil {
		t.Fatalf("he_describe while busy: %v", err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, _, err := quick(context.Background(), nil, struct{}{}); err != nil {
		t.Fatalf("a call once the slot is free: %v", err)
	}
}

// TestToolCallsLogged (issue 25, part 7): each tool call leaves one log
// line naming the agent's token by id and the outcome, and nothing of
// the call's arguments.
func TestToolCallsLogged(t *testing.T) {
	var buf strings.Builder
	s := &Server{log: slog.New(slog.NewJSONHandler(&buf, nil)), cfg: Config{Metrics: nopMetrics{}}}
	h := safe(s, "he_linear", func(context.Context, *mcp.CallToolRequest, struct{ Secret string }) (*mcp.CallToolResult, struct{}, error) {
		return nil, struct{}{}, nil
	})
	req := &mcp.CallToolRequest{Extra: &mcp.RequestExtra{TokenInfo: &auth.TokenInfo{UserID: "0123456789abcdef"}}}
	if _, _, err := h(context.Background(), req, struct{ Secret string }{"argument-value-xyz"}); err != nil {
		t.Fatal(err)
	}
	line := buf.String()
	if !strings.Contains(line, `"msg":"tool call"`) || !strings.Contains(line, `"token_id":"0123456789abcdef"`) || !strings.Contains(line, `"outcome":"ok"`) || strings.Contains(line, "argument-value-xyz") {
		t.Fatalf("log: %s", line)
	}
}
