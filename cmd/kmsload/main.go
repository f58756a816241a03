// Command kmsload is the benchmarks' helper beside wrk (deploy/bench-versions.sh):
//
//	kmsload rotate --addr URL --token-file F --key NAME --to N [--sample K]
//	    rotates the key until its latest version is N, then K more times,
//	    and prints the latency of those K rotations (p50, p99) as one line
//	    "rotate <versions before> <p50 ms> <p99 ms>".
//	kmsload bare-sign --addr HOST:PORT
//	    serves POST /sign ({"message": base64} -> {"signature": base64})
//	    with ML-DSA-65 from circl and nothing else: no authentication,
//	    audit, HSM or store. The reference the API's signing is measured
//	    against.
//
// Both talk plain HTTP on 127.0.0.1 (kmsd with --insecure-http), so that
// the comparison is of the work behind the transport; deploy/bench-tls.sh
// measures what TLS adds.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/api/client"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kmsload rotate|bare-sign [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "rotate":
		err = rotate(os.Args[2:])
	case "bare-sign":
		err = bareSign(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kmsload:", err)
		os.Exit(1)
	}
}

func rotate(args []string) error {
	fs := flag.NewFlagSet("rotate", flag.ExitOnError)
	addr := fs.String("addr", "http://127.0.0.1:8420", "kmsd's URL")
	tokenFile := fs.String("token-file", "", "file holding an admin token")
	key := fs.String("key", "bench", "key to rotate")
	to := fs.Uint64("to", 0, "rotate until the latest version is this")
	sample := fs.Int("sample", 30, "rotations to measure after reaching --to")
	fs.Parse(args)
	tok, err := os.ReadFile(*tokenFile)
	if err != nil {
		return err
	}
	c, err := client.New(*addr, strings.TrimSpace(string(tok)))
	if err != nil {
		return err
	}
	ctx := context.Background()
	k, err := c.GetKeyVersions(ctx, *key, 1)
	if err != nil {
		return err
	}
	for latest := k.LatestVersion; latest < *to; latest++ {
		if _, err := c.Rotate(ctx, *key); err != nil {
			return err
		}
	}
	lat := make([]time.Duration, *sample)
	for i := range lat {
		start := time.Now()
		if _, err := c.Rotate(ctx, *key); err != nil {
			return err
		}
		lat[i] = time.Since(start)
	}
	if len(lat) == 0 {
		return nil
	}
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	fmt.Printf("rotate %d %.2f %.2f\n", max(k.LatestVersion, *to), ms(lat[len(lat)/2]), ms(lat[(len(lat)*99)/100]))
	return nil
}

// bareSign is the reference server: what signing over HTTP costs with
// nothing around it.
func bareSign(args []string) error {
	fs := flag.NewFlagSet("bare-sign", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:8430", "listen address")
	fs.Parse(args)
	_, sk, err := mldsa65.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	http.HandleFunc("POST /sign", func(w http.ResponseWriter, r *http.Request) {
		var req struct{ Message []byte }
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		sig := make([]byte, mldsa65.SignatureSize)
		if err := mldsa65.SignTo(sk, req.Message, nil, true, sig); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		var out bytes.Buffer
		json.NewEncoder(&out).Encode(struct {
			Signature []byte `json:"signature"`
		}{sig})
		w.Header().Set("Content-Type", "application/json")
		w.Write(out.Bytes())
	})
	err = http.ListenAndServe(*addr, nil)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}
