package audit_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
)

type fixture struct {
	pub         []byte
	sk          *mldsa65.PrivateKey
	records     [][]byte
	checkpoints [][]byte // every checkpoint made, oldest first
	log         *audit.Log
	store       *bolt.Store
}

func sign(sk *mldsa65.PrivateKey) func(context.Context, []byte) ([]byte, error) {
	return func(_ context.Context, msg []byte) ([]byte, error) {
		sig := make([]byte, mldsa65.SignatureSize)
		return sig, mldsa65.SignTo(sk, msg, nil, true, sig)
	}
}

// newFixture writes n records through the real bbolt store and makes a
// checkpoint every `every` records and at the end.
func newFixture(t testing.TB, n, every int) *fixture {
	pk, sk, _ := mldsa65.GenerateKey(rand.Reader)
	pub, _ := pk.MarshalBinary()
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f := &fixture{pub: pub, sk: sk, store: st}
	f.log = audit.New(audit.Config{Store: st.Audit(), PublicKey: pub, Sign: sign(sk)})
	ctx := context.Background()
	for i := 0; i < n; i++ {
		rec := &kms.AuditRecord{Time: "2026-11-23T00:00:00Z", RequestID: fmt.Sprintf("req%d", i), Actor: "0123456789abcdef", Role: "admin",
			Source: "127.0.0.1:5000", Operation: "POST /v1/keys/{name}/sign", Key: fmt.Sprintf("key-%d", i%7), Version: uint64(i%3 + 1), Status: 200, ReqBytes: 40 + i}
		if err := st.Audit().AppendAudit(ctx, rec); err != nil {
			t.Fatal(err)
		}
		if (i+1)%every == 0 || i == n-1 {
			if _, err := f.log.Checkpoint(ctx); err != nil {
				t.Fatal(err)
			}
			_, msg, err := st.LatestCheckpoint(ctx)
			if err != nil {
				t.Fatal(err)
			}
			f.checkpoints = append(f.checkpoints, msg)
		}
	}
	f.records, err = st.Audit().AuditRecords(ctx, 0, uint64(n))
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func clone(b [][]byte) [][]byte {
	out := make([][]byte, len(b))
	for i := range b {
		out[i] = bytes.Clone(b[i])
	}
	return out
}

func TestCleanLogsVerify(t *testing.T) {
	for _, c := range []struct{ n, every int }{{1, 1}, {2, 5}, {7, 3}, {64, 64}, {300, 50}, {1000, 333}} {
		f := newFixture(t, c.n, c.every)
		res, _, err := audit.Verify(f.pub, f.records, f.checkpoints, f.checkpoints[0])
		if err != nil {
			t.Fatalf("clean log of %d records: false alarm: %v", c.n, err)
		}
		if res.Size != uint64(c.n) || res.Uncovered != 0 {
			t.Fatalf("result %+v", res)
		}
	}
}

// TestProofsAgreeWithVerifier: the Log's inclusion and consistency proofs
// check against the roots the verifier recomputes.
func TestProofsAgreeWithVerifier(t *testing.T) {
	f := newFixture(t, 123, 40)
	ctx := context.Background()
	_, tree, err := audit.Verify(f.pub, f.records, f.checkpoints, nil)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := tree.Root(123)
	for _, i := range []uint64{0, 1, 61, 122} {
		p, err := f.log.InclusionProof(ctx, i, 123)
		if err != nil {
			t.Fatal(err)
		}
		if err := tlog.CheckRecord(toProof(p), 123, root, int64(i), tree.Leaf(i)); err != nil {
			t.Fatalf("inclusion of %d: %v", i, err)
		}
		if err := tlog.CheckRecord(toProof(p), 123, root, int64(i), tree.Leaf((i+1)%123)); err == nil {
			t.Fatalf("inclusion proof of %d accepted another leaf", i)
		}
	}
	for _, old := range []uint64{1, 40, 80, 122, 123} {
		p, err := f.log.ConsistencyProof(ctx, old, 123)
		if err != nil {
			t.Fatal(err)
		}
		oldRoot, _ := tree.Root(old)
		if err := tlog.CheckTree(toProof(p), 123, root, int64(old), oldRoot); err != nil {
			t.Fatalf("consistency %d->123: %v", old, err)
		}
	}
	if _, err := f.log.InclusionProof(ctx, 123, 123); !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("inclusion of a record past the size: %v", err)
	}
	if _, err := f.log.ConsistencyProof(ctx, 5, 124); !errors.Is(err, kms.ErrInvalid) {
		t.Fatalf("consistency past the log: %v", err)
	}
}

func toProof(p [][32]byte) []tlog.Hash {
	out := make([]tlog.Hash, len(p))
	for i := range p {
		out[i] = p[i]
	}
	return out
}

// TestThousandTamperings: every random tampering of an exported log is
// detected and named; the clean log is verified before each, so the test
// would notice a false alarm too.
func TestThousandTamperings(t *testing.T) {
	f := newFixture(t, 200, 25)
	if _, _, err := audit.Verify(f.pub, f.records, f.checkpoints, nil); err != nil {
		t.Fatalf("false alarm on the clean log: %v", err)
	}
	rng := mrand.New(mrand.NewPCG(1, 2))
	kinds := []string{"bitflip", "delete", "swap", "truncate", "insert", "rollback", "fork", "checkpoint-bitflip", "replay-other-index"}
	counts := map[string]int{}
	for trial := 0; trial < 1000; trial++ {
		kind := kinds[trial%len(kinds)]
		recs, cps := clone(f.records), clone(f.checkpoints)
		var saved []byte
		n := len(recs)
		i := rng.IntN(n)
		wantChecks := []string{}
		switch kind {
		case "bitflip":
			b := recs[i]
			b[rng.IntN(len(b))] ^= 1 << rng.IntN(8)
			wantChecks = []string{"record", "chain", "root"}
		case "delete":
			recs = slices.Delete(recs, i, i+1)
			wantChecks = []string{"record", "truncated"}
		case "swap":
			j := rng.IntN(n)
			for j == i {
				j = rng.IntN(n)
			}
			recs[i], recs[j] = recs[j], recs[i]
			wantChecks = []string{"record"}
		case "truncate":
			recs = recs[:i]
			wantChecks = []string{"truncated"}
		case "insert":
			recs = slices.Insert(recs, i, bytes.Clone(recs[rng.IntN(n)]))
			wantChecks = []string{"record"}
		case "replay-other-index":
			// A well-formed record with the right index but other content.
			r, _ := kms.DecodeAuditRecord(recs[i])
			r.Status = 500 + rng.IntN(99)
			recs[i] = r.Encode()
			wantChecks = []string{"chain", "root"}
		case "rollback":
			// The log is shown as it was at an older checkpoint; the
			// client saved a newer one.
			k := rng.IntN(len(cps) - 1)
			old, _ := audit.OpenCheckpoint(cps[k], f.pub)
			saved = cps[k+1+rng.IntN(len(cps)-k-1)]
			recs, cps = recs[:old.Size], cps[:k+1]
			wantChecks = []string{"rollback"}
		case "fork":
			// A second checkpoint of an existing size with another root,
			// signed by the real key (a misbehaving or compromised server).
			c, _ := audit.OpenCheckpoint(cps[rng.IntN(len(cps))], f.pub)
			c.Root[rng.IntN(32)] ^= 1 << rng.IntN(8)
			forged, err := audit.SignCheckpoint(c, audit.NewNoteSigner(f.pub, func(m []byte) ([]byte, error) { return sign(f.sk)(context.Background(), m) }))
			if err != nil {
				t.Fatal(err)
			}
			if rng.IntN(2) == 0 {
				saved = forged
			} else {
				cps = append(cps, forged)
			}
			wantChecks = []string{"fork"}
		case "checkpoint-bitflip":
			k := rng.IntN(len(cps))
			cps[k][rng.IntN(len(cps[k]))] ^= 1 << rng.IntN(8)
			wantChecks = []string{"signature"}
		}
		_, _, err := audit.Verify(f.pub, recs, cps, saved)
		var p *audit.Problem
		if !errors.As(err, &p) {
			t.Fatalf("trial %d (%s at %d): not detected (err %v)", trial, kind, i, err)
		}
		if !slices.Contains(wantChecks, p.Check) {
			t.Fatalf("trial %d (%s at %d): named %q, want one of %v: %v", trial, kind, i, p.Check, wantChecks, p)
		}
		if kind == "bitflip" && p.Check != "root" && (p.Index < int64(i)-1 || p.Index > int64(i)) {
			t.Fatalf("trial %d: bit flip in record %d reported at %d: %v", trial, i, p.Index, p)
		}
		counts[kind]++
	}
	t.Logf("detected: %v", counts)
}

// TestVerifyRefusesAnotherIdentity: checkpoints signed by another identity
// key, or checked with another key, fail the signature check.
func TestVerifyRefusesAnotherIdentity(t *testing.T) {
	f := newFixture(t, 10, 5)
	g := newFixture(t, 10, 5)
	if _, _, err := audit.Verify(g.pub, f.records, f.checkpoints, nil); err == nil {
		t.Fatal("a log verified with another identity key")
	}
	var p *audit.Problem
	_, _, err := audit.Verify(f.pub, f.records, append(clone(f.checkpoints), g.checkpoints[0]), nil)
	if !errors.As(err, &p) || p.Check != "signature" {
		t.Fatalf("a checkpoint of another service: %v", err)
	}
}

func TestMain(m *testing.M) { testhsm.Main(m) }
