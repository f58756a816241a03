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
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/hsm/softhsm"
	"github.com/kmsd-project/kmsd/internal/app"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
)

func main() {
	dur := flag.Duration("duration", 5*time.Second, "how long each measurement runs")
	conc := flag.String("concurrency", "1,16", "comma-separated concurrencies")
	ttl := flag.Duration("key-cache-ttl", 5*time.Minute, "unsealed-key cache TTL of the server (0: off)")
	msgSize := flag.Int("message-size", 256, "bytes per message")
	scenario := flag.String("scenario", "sign", "sign: the API beside raw circl; audit: the API with the audit log on and off; hekeygen: one HE keyset's time and peak RSS")
	flag.StringVar(&heParams, "params", "ckks-logn15", "hekeygen scenario: the CKKS preset")
	unaudited := flag.Bool("unaudited", false, "sign scenario: serve without the audit log (benchmark only; kmsd always audits)")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	flag.Parse()
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kmsbench:", err)
			os.Exit(1)
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	if err := run(*dur, *conc, *ttl, *msgSize, *scenario, !*unaudited); err != nil {
		fmt.Fprintln(os.Stderr, "kmsbench:", err)
		pprof.StopCPUProfile()
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

// server is one in-process kmsd stack on 127.0.0.1.
type server struct {
	base, admin string
	store       *bolt.Store
	close       func()
}

// newServer starts the real router over the SoftHSM sealer and a fresh
// bbolt file in dir; audited turns the audit log on (as kmsd always has it).
// noIO (benchmark decomposition only, with audited) acknowledges each
// request's record at once without writing it: what the audit pipeline
// costs apart from making records durable.
func newServer(dir string, sealer *hsm.Sealer, ttl time.Duration, audited, noIO bool) (*server, error) {
	store, err := bolt.Open(filepath.Join(dir, fmt.Sprintf("kms-%v-%v.db", audited, noIO)), bolt.Options{})
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	var admin string
	cfg := app.Config{Store: store, AuditStore: store.Audit(), Sealer: sealer, Service: kms.Config{CacheTTL: ttl}, Unaudited: !audited,
		AdminToken: func(t string) error { admin = t; return nil }}
	if audited && noIO {
		cfg.AuditStore = ackWithoutIO{store.Audit()}
	}
	a, err := app.New(ctx, cfg)
	if err != nil {
		return nil, err
	}
	a.Start()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	srv := &http.Server{Handler: a.Handler()}
	go srv.Serve(ln)
	s := &server{base: "http://" + ln.Addr().String(), admin: admin, store: store}
	s.close = func() { srv.Close(); a.Close(); store.Close() }
	c, _ := client.New(s.base, admin)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "bench", Kind: "ml-dsa-65"}); err != nil {
		return nil, err
	}
	// A few keys besides, so the store is not trivially small.
	for i := 0; i < 50; i++ {
		c.CreateKey(ctx, client.CreateKeyRequest{Name: fmt.Sprintf("other-%02d", i), Kind: "ml-dsa-65"})
	}
	return s, nil
}

// ackWithoutIO acknowledges records without making them durable. For the
// audit scenario's decomposition only: never a stand-in for the log.
type ackWithoutIO struct{ *engine.Log }

func (ackWithoutIO) AppendAudit(_ context.Context, r *kms.AuditRecord) error {
	r.Committed = true
	return nil
}

func (ackWithoutIO) Expect() func() { return func() {} }

// apiLoad runs one kind of request against s from n clients for d.
func apiLoad(s *server, n int, d time.Duration, method, path string, body []byte, check func(*http.Response) error) (result, error) {
	tr := &http.Transport{MaxIdleConnsPerHost: n, MaxConnsPerHost: n}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	res := load(n, d, func() error {
		var rd *bytes.Reader
		if body != nil {
			rd = bytes.NewReader(body)
		}
		req, _ := http.NewRequest(method, s.base+path, nil)
		if rd != nil {
			req, _ = http.NewRequest(method, s.base+path, rd)
			req.Header.Set("Content-Type", "application/json")
		}
		req.Header.Set("Authorization", "Bearer "+s.admin)
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return check(resp)
	})
	if res.failures > 0 {
		return res, fmt.Errorf("%d requests to %s failed", res.failures, path)
	}
	return res, nil
}

func checkSign(resp *http.Response) error {
	var out client.SignResponse
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || len(out.Signature) != mldsa65.SignatureSize {
		return fmt.Errorf("bad signature answer")
	}
	return nil
}

func checkPublicKey(resp *http.Response) error {
	var out client.PublicKey
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || len(out.PublicKey) != mldsa65.PublicKeySize {
		return fmt.Errorf("bad public key answer")
	}
	return nil
}

func run(dur time.Duration, concList string, ttl time.Duration, msgSize int, scenario string, audited bool) error {
	dir, err := os.MkdirTemp("", "kmsbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	st, err := softhsm.Bootstrap(filepath.Join(dir, "softhsm"), "kmsbench", true)
	if err != nil {
		return err
	}
	pin, _ := softhsm.ReadPIN(st.PINFile)
	sealer, err := hsm.Open(hsm.Config{Module: st.Module, TokenLabel: st.TokenLabel, PIN: pin, CreateKEK: true})
	if err != nil {
		return err
	}
	defer sealer.Close()
	ttlLabel := ttl.String()
	if ttl == 0 {
		ttl, ttlLabel = -1, "off"
	}
	msg := make([]byte, msgSize)
	rand.Read(msg)
	body, _ := json.Marshal(client.SignRequest{Message: msg})
	var concs []int
	for _, cs := range strings.Split(concList, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(cs))
		if err != nil || n < 1 {
			return fmt.Errorf("bad concurrency %q", cs)
		}
		concs = append(concs, n)
	}
	fmt.Printf("# kmsbench %s: %v per measurement, GOMAXPROCS=%d, %s/%s, server key cache TTL %s\n",
		scenario, dur, runtime.GOMAXPROCS(0), runtime.GOOS, runtime.GOARCH, ttlLabel)
	switch scenario {
	case "sign":
		s, err := newServer(dir, sealer, ttl, audited, false)
		if err != nil {
			return err
		}
		defer s.close()
		_, sk, _ := mldsa65.GenerateKey(rand.Reader)
		fmt.Printf("# ml-dsa-65 sign of %d-byte messages through the API (audit log %s) vs raw circl in-process\n", msgSize, map[bool]string{true: "on", false: "off"}[audited])
		fmt.Println("| concurrency | raw circl ops/s | API ops/s | API/raw | API p50 | API p99 | raw p50 | raw p99 |")
		fmt.Println("|---|---|---|---|---|---|---|---|")
		for _, n := range concs {
			raw := load(n, dur, func() error {
				sig := make([]byte, mldsa65.SignatureSize)
				return mldsa65.SignTo(sk, msg, nil, true, sig)
			})
			apiRes, err := apiLoad(s, n, dur, "POST", "/v1/keys/bench/sign", body, checkSign)
			if err != nil {
				return err
			}
			fmt.Printf("| %d | %.0f | %.0f | %.2f | %v | %v | %v | %v |\n", n, raw.rate(), apiRes.rate(), apiRes.rate()/raw.rate(),
				apiRes.pct(0.5).Round(time.Microsecond), apiRes.pct(0.99).Round(time.Microsecond),
				raw.pct(0.5).Round(time.Microsecond), raw.pct(0.99).Round(time.Microsecond))
		}
	case "hekeygen":
		return heKeygen(dir, heParams)
	case "audit":
		on, err := newServer(dir, sealer, ttl, true, false)
		if err != nil {
			return err
		}
		defer on.close()
		off, err := newServer(dir, sealer, ttl, false, false)
		if err != nil {
			return err
		}
		defer off.close()
		pipe, err := newServer(dir, sealer, ttl, true, true)
		if err != nil {
			return err
		}
		defer pipe.close()
		fmt.Println("# the same requests with the audit log on (as kmsd runs) and off (benchmark-only); 'pipeline only' audits each request but acknowledges its record without writing it (decomposition only)")
		fmt.Println("| request | concurrency | audit off ops/s | pipeline only ops/s | audit on ops/s | pipeline/off | on/off | on p50 | on p99 | fsyncs per 1000 audited requests (2 per bbolt commit, 1 per WAL frame) |")
		fmt.Println("|---|---|---|---|---|---|---|---|---|---|")
		for _, req := range []struct {
			name, method, path string
			body               []byte
			check              func(*http.Response) error
		}{
			{"GET public-key", "GET", "/v1/keys/bench/versions/primary/public-key", nil, checkPublicKey},
			{"POST sign", "POST", "/v1/keys/bench/sign", body, checkSign},
		} {
			for _, n := range concs {
				offRes, err := apiLoad(off, n, dur, req.method, req.path, req.body, req.check)
				if err != nil {
					return err
				}
				pipeRes, err := apiLoad(pipe, n, dur, req.method, req.path, req.body, req.check)
				if err != nil {
					return err
				}
				before := on.store.Fsyncs()
				onRes, err := apiLoad(on, n, dur, req.method, req.path, req.body, req.check)
				if err != nil {
					return err
				}
				fsyncs := on.store.Fsyncs() - before
				fmt.Printf("| %s | %d | %.0f | %.0f | %.0f | %.2f | %.2f | %v | %v | %.1f |\n", req.name, n, offRes.rate(), pipeRes.rate(), onRes.rate(), pipeRes.rate()/offRes.rate(), onRes.rate()/offRes.rate(),
					onRes.pct(0.5).Round(time.Microsecond), onRes.pct(0.99).Round(time.Microsecond), 1000*float64(fsyncs)/float64(onRes.ops))
			}
		}
	default:
		return fmt.Errorf("unknown scenario %q (sign, audit or hekeygen)", scenario)
	}
	return nil
}

var heParams string

// heKeygen generates one CKKS keyset (public, relinearization, and Galois
// keys for all power-of-two rotations) with he.Generate into a blob store,
// and reports time and the process's peak RSS against the size of one
// Galois key. Run it alone: peak RSS covers the whole process.
func heKeygen(dir, preset string) error {
	p, err := he.Resolve(he.CKKS, []byte(`"`+preset+`"`))
	if err != nil {
		return err
	}
	var rots []int
	for k := 1; k < p.CKKS.MaxSlots(); k *= 2 {
		rots = append(rots, k)
	}
	spec := he.KeySpec{Rotations: rots, Relinearization: true}
	gal, err := he.GaloisElements(p, spec)
	if err != nil {
		return err
	}
	store, err := he.OpenDirBlobs(filepath.Join(dir, "blobs"))
	if err != nil {
		return err
	}
	seed := make([]byte, he.SeedSize)
	rand.Read(seed)
	sk, err := he.SecretKey(p.RLWE(), seed)
	if err != nil {
		return err
	}
	_, _, gk := he.KeySizes(p)
	var before syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	start := time.Now()
	blobs, err := he.Generate(context.Background(), p, sk, spec, gal, store, 0, nil, false)
	if err != nil {
		return err
	}
	el := time.Since(start)
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	var total int64
	for _, b := range blobs {
		total += b.Size
	}
	peak := ru.Maxrss << 10 // KiB on Linux
	fmt.Printf("# he.Generate %s: %d keys (%d Galois), %d MiB in %v on %d workers\n", preset, len(blobs), len(gal), total>>20, el.Round(time.Millisecond), runtime.GOMAXPROCS(0))
	fmt.Printf("peak RSS %d MiB; one Galois key %d MiB; target (4 Galois keys + 100 MiB) %d MiB\n", peak>>20, gk>>20, (4*int64(gk)+100<<20)>>20)
	return nil
}
