package kms_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/pqc"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// fakeThr is a threshold kind whose keyset is the round-1 sum's digest:
// another sum, another public key.
type fakeThr struct{ fakeHE }

func (*fakeThr) Name() string { return "fake-thr" }
func (*fakeThr) NewThresholdSetup(kms.Policy, int, [32]byte) (kms.ThresholdSetup, error) {
	return fakeSetup{}, nil
}
func (*fakeThr) AggregateRound1(_ kms.Policy, all [][]byte) ([]byte, error) {
	return bytes.Join(all, nil), nil
}
func (*fakeThr) AggregateRound2(_ kms.Policy, all [][]byte) ([]byte, error) {
	return bytes.Join(all, nil), nil
}
func (*fakeThr) PartialDecrypt(kms.Secret, []byte, []int, any, []byte, kms.DecryptPlan) ([]byte, error) {
	return nil, errors.New("fake")
}

type fakeSetup struct{}

func (fakeSetup) Round1() ([]byte, map[int][]byte, error) { return []byte("r1"), map[int][]byte{}, nil }
func (fakeSetup) Round2([]byte) ([]byte, error)           { return []byte("r2"), nil }
func (fakeSetup) Finish(_ context.Context, agg1, _ []byte, _ map[int][]byte) (*kms.Keyset, kms.Secret, error) {
	sum := sha256.Sum256(agg1)
	return &kms.Keyset{ParamsID: "fake", Params: json.RawMessage(`{}`), PublicKey: kms.BlobRef{Digest: "sha256:" + hex.EncodeToString(sum[:]), Size: 1}}, kms.NewSecret([]byte("share")), nil
}

// fakePeers connects in-process services by name (nil: a node the test
// plays).
type fakePeers struct {
	self  string
	nodes map[string]*kms.Service
}

func (p *fakePeers) Self() string { return p.self }
func (p *fakePeers) Known(name string) bool {
	_, ok := p.nodes[name]
	return ok
}
func (p *fakePeers) Send(context.Context, string, string, []byte) ([]byte, error) {
	return nil, errors.New("no transport in this test")
}
func (p *fakePeers) Verify(name string, msg, c, sig []byte) bool {
	svc := p.nodes[name]
	if svc == nil {
		return false
	}
	_, raw, err := svc.Identity(ctx)
	var pub mldsa65.PublicKey
	if err != nil || pub.UnmarshalBinary(raw) != nil {
		return false
	}
	return mldsa65.Verify(&pub, msg, c, sig)
}

func frame(header any, parts ...[]byte) []byte {
	h, _ := json.Marshal(header)
	var b bytes.Buffer
	for _, p := range append([][]byte{h}, parts...) {
		b.Write(binary.BigEndian.AppendUint64(nil, uint64(len(p))))
		b.Write(p)
	}
	return b.Bytes()
}

func unframeHeader(t *testing.T, b []byte, h any) {
	t.Helper()
	n := binary.BigEndian.Uint64(b)
	if err := json.Unmarshal(b[8:8+n], h); err != nil {
		t.Fatal(err)
	}
}

// TestCoordinatorCannotCommitDifferentManifests: a coordinating party
// ("a", played by the test) gives parties b and c different round-1
// sums, hence different public keys. Each party's commit must be backed
// by every party's word on the same manifest; before, each party
// committed on the coordinator's word alone (finish's digest is checked
// only by the coordinator), so b and c served different keys for the
// same key and version, one of them possibly the coordinator's alone.
func TestCoordinatorCannotCommitDifferentManifests(t *testing.T) {
	nodes := map[string]*kms.Service{"a": nil}
	for _, name := range []string{"b", "c"} {
		st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		svc, err := kms.NewService(kms.Config{Store: st, Sealer: testhsm.Open(t), Kinds: kms.NewRegistry(append(pqc.Kinds(), &fakeThr{})...),
			Clock: testutil.NewClock(time.Now().UTC()), Peers: &fakePeers{self: name, nodes: nodes}})
		if err != nil {
			t.Fatal(err)
		}
		if err := svc.EnsureIdentity(ctx); err != nil {
			t.Fatal(err)
		}
		nodes[name] = svc
	}
	run := "0123456789abcdef0123456789abcdef"
	type header struct {
		Run        string            `json:"run"`
		Digest     string            `json:"digest,omitempty"`
		Signature  []byte            `json:"signature,omitempty"`
		Signatures map[string][]byte `json:"signatures,omitempty"`
	}
	pol := kms.Policy{Threshold: &kms.ThresholdPolicy{Parties: []string{"a", "b", "c"}, T: 2}}
	finished := map[string]header{}
	for _, name := range []string{"b", "c"} {
		call := nodes[name].For(nil)
		begin := frame(map[string]any{"run": run, "coordinator": "a", "key": "joint", "kind": "fake-thr", "version": 1, "policy": pol, "created_at": time.Now().UTC().Truncate(time.Second)})
		out, err := call.HandlePeer(ctx, "a", kms.PeerSetupBegin, begin)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := call.HandlePeer(ctx, "a", kms.PeerSetupRound1, frame(header{Run: run}, make([]byte, 32))); err != nil {
			// The contributions, this party's at its place (kmsd
			// after the CRS check).
			seeds := make([]byte, 96)
			self := map[string]int{"b": 1, "c": 2}[name]
			copy(seeds[32*self:], out[len(out)-32:])
			if _, err := call.HandlePeer(ctx, "a", kms.PeerSetupRound1, frame(header{Run: run}, seeds)); err != nil {
				t.Fatal(err)
			}
		}
		agg1 := []byte("the sum given to " + name)
		if _, err := call.HandlePeer(ctx, "a", kms.PeerSetupRound2, frame(header{Run: run}, agg1)); err != nil {
			t.Fatal(err)
		}
		out, err = call.HandlePeer(ctx, "a", kms.PeerSetupFinish, frame(header{Run: run}, agg1, []byte("r2")))
		if err != nil {
			t.Fatal(err)
		}
		var h header
		unframeHeader(t, out, &h)
		finished[name] = h
	}
	if finished["b"].Digest == finished["c"].Digest {
		t.Fatal("the test's two sums made the same manifest")
	}
	committed := 0
	for _, name := range []string{"b", "c"} {
		call := nodes[name].For(nil)
		// What the coordinator has: each party's digest (and whatever
		// each party said of its own).
		_, err := call.HandlePeer(ctx, "a", kms.PeerSetupCommit, frame(header{Run: run, Digest: finished[name].Digest}))
		if err != nil {
			sigs := map[string][]byte{}
			for n, h := range finished {
				sigs[n] = h.Signature
			}
			_, err = call.HandlePeer(ctx, "a", kms.PeerSetupCommit, frame(header{Run: run, Digest: finished[name].Digest, Signatures: sigs}))
		}
		if err == nil {
			committed++
		}
	}
	if committed == 2 {
		t.Fatal("b and c committed different manifests (different public keys) for version 1 of the same key, on the coordinator's word")
	}
}

// TestCoordinatorDoesNotChooseTheCRS: "The CRS seed: no party chooses it
// alone" (runThresholdSetup). Before, a party took whatever 32 bytes the
// coordinator sent at round 1 as the seed; now it derives the seed from
// every party's contribution and checks its own is there.
func TestCoordinatorDoesNotChooseTheCRS(t *testing.T) {
	nodes := map[string]*kms.Service{"a": nil, "c": nil}
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	svc, err := kms.NewService(kms.Config{Store: st, Sealer: testhsm.Open(t), Kinds: kms.NewRegistry(append(pqc.Kinds(), &fakeThr{})...),
		Clock: testutil.NewClock(time.Now().UTC()), Peers: &fakePeers{self: "b", nodes: nodes}})
	if err != nil {
		t.Fatal(err)
	}
	nodes["b"] = svc
	run := "0123456789abcdef0123456789abcdef"
	pol := kms.Policy{Threshold: &kms.ThresholdPolicy{Parties: []string{"a", "b", "c"}, T: 2}}
	call := svc.For(nil)
	begin := frame(map[string]any{"run": run, "coordinator": "a", "key": "joint", "kind": "fake-thr", "version": 1, "policy": pol, "created_at": time.Now().UTC().Truncate(time.Second)})
	if _, err := call.HandlePeer(ctx, "a", kms.PeerSetupBegin, begin); err != nil {
		t.Fatal(err)
	}
	chosen := bytes.Repeat([]byte{7}, 32)
	if _, err := call.HandlePeer(ctx, "a", kms.PeerSetupRound1, frame(map[string]string{"run": run}, chosen)); err == nil {
		t.Fatal("party b took the coordinator's CRS seed")
	}
	if _, err := call.HandlePeer(ctx, "a", kms.PeerSetupRound1, frame(map[string]string{"run": run}, bytes.Repeat(chosen, 3))); err == nil {
		t.Fatal("party b took contributions without its own")
	}
}
