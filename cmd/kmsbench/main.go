// Command kmsbench measures ML-DSA-65 signing through the whole kmsd stack
// (HTTP on 127.0.0.1, auth, bbolt, SoftHSM-sealed key with the unsealed-key
// cache) beside raw in-process circl signing, in the same run, at several
// concurrencies. It sets up its own SoftHSM token and bbolt file in a temp
// dir. Figures go to BENCHMARKS.md.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"kmsd/api"
	"kmsd/api/client"
	"kmsd/hsm"
	"kmsd/hsm/softhsm"
	"kmsd/kms"
	"kmsd/kms/bolt"
	"kmsd/kms/pqc"
)

func main() {
	dur := flag.Duration("duration", 5*time.Second, "how long each measurement runs")
	conc := flag.String("concurrency", "1,16", "comma-separated concurrencies")
	ttl := flag.Duration("key-cache-ttl", 5*time.Minute, "unsealed-key cache TTL of the server (0: off)")
	msgSize := flag.Int("message-size", 256, "bytes per message")
	flag.Parse()
	if err := run(*dur, *conc, *ttl, *msgSize); err != nil {
		fmt.Fprintln(os.Stderr, "kmsbench:", err)
		os.Exit(1)
	}
}

type result struct {
	ops      int
	elapsed  time.Duration
	lat      []time.Duration
	failures int
}

func (r result) rate() float64 { return float64(r.ops) / r.elapsed.Seconds() }

func (r result) pct(p float64) time.Duration {
	if len(r.lat) == 0 {
		return 0
	}
	slices.Sort(r.lat)
	return r.lat[int(float64(len(r.lat)-1)*p)]
}

// load runs fn from c goroutines for d and records each call's latency.
func load(c int, d time.Duration, fn func() error) result {
	var mu sync.Mutex
	var all []time.Duration
	failures := 0
	deadline := time.Now().Add(d)
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < c; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lat []time.Duration
			fails := 0
			for time.Now().Before(deadline) {
				t := time.Now()
				if err := fn(); err != nil {
					fails++
					continue
				}
				lat = append(lat, time.Since(t))
			}
			mu.Lock()
			all = append(all, lat...)
			failures += fails
			mu.Unlock()
		}()
	}
	wg.Wait()
	return result{ops: len(all), elapsed: time.Since(start), lat: all, failures: failures}
}

func run(dur time.Duration, concList string, ttl time.Duration, msgSize int) error {
	dir, err := os.MkdirTemp("", "kmsbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	st, err := softhsm.Bootstrap(filepath.Join(dir, "softhsm"), "kmsbench")
	if err != nil {
		return err
	}
	pin, _ := softhsm.ReadPIN(st.PINFile)
	sealer, err := hsm.Open(hsm.Config{Module: st.Module, TokenLabel: st.TokenLabel, PIN: pin})
	if err != nil {
		return err
	}
	defer sealer.Close()
	store, err := bolt.Open(filepath.Join(dir, "kms.db"), bolt.Options{})
	if err != nil {
		return err
	}
	defer store.Close()
	ttlLabel := ttl.String()
	if ttl == 0 {
		ttl, ttlLabel = -1, "off"
	}
	svc, err := kms.NewService(kms.Config{Store: store, Sealer: sealer, Kinds: kms.NewRegistry(pqc.Kinds()...), CacheTTL: ttl})
	if err != nil {
		return err
	}
	ctx := context.Background()
	var admin string
	if _, err := svc.EnsureAdminToken(ctx, func(t string) error { admin = t; return nil }); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: api.New(svc, slog.New(slog.DiscardHandler), api.Options{}).Handler()}
	go srv.Serve(ln)
	defer srv.Close()
	base := "http://" + ln.Addr().String()
	c, _ := client.New(base, admin)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "bench", Kind: "ml-dsa-65"}); err != nil {
		return err
	}
	// A few keys besides, so the store is not trivially small.
	for i := 0; i < 50; i++ {
		c.CreateKey(ctx, client.CreateKeyRequest{Name: fmt.Sprintf("other-%02d", i), Kind: "ml-dsa-65"})
	}

	msg := make([]byte, msgSize)
	rand.Read(msg)
	_, sk, _ := mldsa65.GenerateKey(rand.Reader)
	body, _ := json.Marshal(client.SignRequest{Message: msg})

	fmt.Printf("# kmsbench: ml-dsa-65 sign, %d-byte messages, %v per measurement, GOMAXPROCS=%d, %s/%s\n",
		msgSize, dur, runtime.GOMAXPROCS(0), runtime.GOOS, runtime.GOARCH)
	fmt.Printf("# server key cache TTL: %s\n", ttlLabel)
	fmt.Println("| concurrency | raw circl ops/s | API ops/s | API/raw | API p50 | API p99 | raw p50 | raw p99 |")
	fmt.Println("|---|---|---|---|---|---|---|---|")
	for _, cs := range strings.Split(concList, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(cs))
		if err != nil || n < 1 {
			return fmt.Errorf("bad concurrency %q", cs)
		}
		raw := load(n, dur, func() error {
			sig := make([]byte, mldsa65.SignatureSize)
			return mldsa65.SignTo(sk, msg, nil, true, sig)
		})
		tr := &http.Transport{MaxIdleConnsPerHost: n, MaxConnsPerHost: n}
		hc := &http.Client{Transport: tr}
		apiRes := load(n, dur, func() error {
			req, _ := http.NewRequest("POST", base+"/v1/keys/bench/sign", bytes.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+admin)
			req.Header.Set("Content-Type", "application/json")
			resp, err := hc.Do(req)
			if err != nil {
				return err
			}
			var out client.SignResponse
			err = json.NewDecoder(resp.Body).Decode(&out)
			resp.Body.Close()
			if err != nil || resp.StatusCode != 200 || len(out.Signature) != mldsa65.SignatureSize {
				return fmt.Errorf("status %d", resp.StatusCode)
			}
			return nil
		})
		tr.CloseIdleConnections()
		if apiRes.failures > 0 {
			return fmt.Errorf("%d API requests failed", apiRes.failures)
		}
		fmt.Printf("| %d | %.0f | %.0f | %.2f | %v | %v | %v | %v |\n", n, raw.rate(), apiRes.rate(), apiRes.rate()/raw.rate(),
			apiRes.pct(0.5).Round(time.Microsecond), apiRes.pct(0.99).Round(time.Microsecond),
			raw.pct(0.5).Round(time.Microsecond), raw.pct(0.99).Round(time.Microsecond))
	}
	return nil
}
