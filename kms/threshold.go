package kms

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/kmsd-project/kmsd/kms/wire"
)

// Threshold HE keys: a key's secret exists only as Shamir shares held by
// n kmsd nodes (parties), one each, sealed in each node's HSM; t of them
// decrypt together. The node where an administrator creates (or rotates)
// the key coordinates the setup; the node a decryptor asks coordinates the
// decryption. Nodes reach each other through Peers, which authenticates
// every message with the sender's ML-DSA identity key.

// ThresholdPolicy makes an HE key a threshold key: the kmsd nodes that hold
// its shares (peer names; this node among them; their order gives each its
// Shamir point, 1..n) and how many of them decrypt together.
type ThresholdPolicy struct {
	Parties []string `json:"parties"`
	T       int      `json:"t"`
	// Requesters, if set, are the ML-DSA-65 public keys (base64) whose
	// holders may have the key decrypt: every party checks the request's
	// signature by one of them (RequesterSignature), so that no node,
	// the coordinating one included, can ask for a decryption alone.
	Requesters []string `json:"requesters,omitempty"`
}

// MaxRequesters bounds policy.threshold.requesters.
const MaxRequesters = 16

// RequesterSignature is a requester's signature on a threshold decryption.
type RequesterSignature = wire.RequesterSignature

// requesterWindow is how far a requester's signature time may be from a
// party's clock.
const requesterWindow = 5 * time.Minute

// MaxThresholdParties bounds a threshold key's parties.
const MaxThresholdParties = 16

// Peers are the other kmsd nodes this one runs threshold protocols with.
type Peers interface {
	// Self is this node's name.
	Self() string
	// Known reports whether name is a configured peer (or this node).
	Known(name string) bool
	// Send sends a protocol message to a peer and returns its answer,
	// both authenticated with the sender's identity key.
	Send(ctx context.Context, peer, op string, body []byte) ([]byte, error)
	// Verify checks a signature by a peer's identity key (this node's
	// own included).
	Verify(peer string, msg, context, sig []byte) bool
}

// ThresholdKind is a keyset kind whose keys can be threshold keys.
type ThresholdKind interface {
	KeysetKind
	// NewThresholdSetup starts party self's (1..n) part of a setup for
	// policy p with the common reference string's seed crs.
	NewThresholdSetup(p Policy, self int, crs [32]byte) (ThresholdSetup, error)
	// AggregateRound1 and AggregateRound2 sum the parties' round
	// messages (no secret is needed).
	AggregateRound1(p Policy, all [][]byte) ([]byte, error)
	AggregateRound2(p Policy, all [][]byte) ([]byte, error)
	// PartialDecrypt is party share's answer (the share unsealed) to a
	// decryption of ct (parsed by ParseCiphertext) by the parties active
	// for the requester's public key target, flooded as plan says.
	PartialDecrypt(share Secret, manifest []byte, active []int, ct any, target []byte, plan DecryptPlan) ([]byte, error)
}

// ThresholdSetup is one party's state during a setup.
type ThresholdSetup interface {
	// Round1 returns the party's round-1 message and the Shamir shares
	// of its secret for the other parties (by point).
	Round1() ([]byte, map[int][]byte, error)
	Round2(agg1 []byte) ([]byte, error)
	// Finish writes the collective keys as blobs (full form: the same
	// bytes at every party) and returns them with the party's share.
	Finish(ctx context.Context, agg1, agg2 []byte, private map[int][]byte) (*Keyset, Secret, error)
}

// The operations of the threshold protocols between nodes.
const (
	PeerSetupBegin   = "setup-begin"
	PeerSetupRound1  = "setup-round1"
	PeerSetupShamir  = "setup-shamir"
	PeerSetupRound2  = "setup-round2"
	PeerSetupFinish  = "setup-finish"
	PeerSetupCommit  = "setup-commit"
	PeerSetupAbort   = "setup-abort"
	PeerDecrypt      = "decrypt-partial"
	PeerPing         = "ping"
	thrRunTTL        = 10 * time.Minute
	maxThrRunsActive = 4
	// maxThrRunsPerPeer: no one coordinator fills the table.
	maxThrRunsPerPeer = 2
)

// PeerOps lists the operations a node answers.
var PeerOps = []string{PeerSetupBegin, PeerSetupRound1, PeerSetupShamir, PeerSetupRound2, PeerSetupFinish, PeerSetupCommit, PeerSetupAbort, PeerDecrypt, PeerPing}

// checkThreshold validates a threshold policy against this node's peers.
func (s *Service) checkThreshold(kind KeyKind, p Policy) error {
	tp := p.Threshold
	if tp == nil {
		return nil
	}
	if _, ok := kind.(ThresholdKind); !ok {
		return Errorf(KindInvalid, "threshold applies to the HE kinds (ckks, bgv)")
	}
	if s.peers == nil {
		return Errorf(KindFailedPrecondition, "this kmsd has no peers (--peers): a threshold key needs the nodes that hold its shares")
	}
	n := len(tp.Parties)
	switch {
	case n < 2 || n > MaxThresholdParties:
		return Errorf(KindInvalid, "threshold.parties names %d nodes; from 2 to %d", n, MaxThresholdParties)
	case tp.T < 2 || tp.T > n:
		return Errorf(KindInvalid, "threshold.t must be from 2 to the number of parties (%d): with t = 1 every node alone could decrypt", n)
	case !slices.Contains(tp.Parties, s.peers.Self()):
		return Errorf(KindInvalid, "threshold.parties must include this node (%q)", s.peers.Self())
	}
	seen := map[string]bool{}
	for _, name := range tp.Parties {
		if seen[name] {
			return Errorf(KindInvalid, "threshold.parties lists %q twice", clip(name, 64))
		}
		seen[name] = true
		if !s.peers.Known(name) {
			return Errorf(KindInvalid, "threshold.parties names %q, which is not a configured peer of this node", clip(name, 64))
		}
	}
	if len(tp.Requesters) > MaxRequesters {
		return Errorf(KindInvalid, "threshold.requesters names %d keys; at most %d", len(tp.Requesters), MaxRequesters)
	}
	for i, r := range tp.Requesters {
		if _, err := requesterKey(r); err != nil {
			return Errorf(KindInvalid, "threshold.requesters[%d] is not an ML-DSA-65 public key in base64", i)
		}
		if slices.Index(tp.Requesters, r) != i {
			return Errorf(KindInvalid, "threshold.requesters lists a key twice")
		}
	}
	if p.RotationPeriod > 0 {
		return Errorf(KindInvalid, "rotation_period does not apply to a threshold key yet: its parties rotate it together when an administrator asks")
	}
	if p.OnDemandGaloisKeys > 0 {
		return Errorf(KindInvalid, "on_demand_galois_keys does not apply to a threshold key: its Galois keys are made jointly, with the policy's rotations")
	}
	return nil
}

// thrRun is one setup in progress at a party.
type thrRun struct {
	step        sync.Mutex // held by the step running
	id          string
	coordinator string
	key, kind   string
	version     uint64
	policy      Policy
	createdAt   time.Time
	self        int
	setup       ThresholdSetup
	private     map[int][]byte
	keyset      *Keyset
	share       Secret
	manifest    []byte
	expires     time.Time
	// contribution is this party's share of the CRS seed (begin).
	contribution []byte
}

type thrRuns struct {
	mu sync.Mutex
	m  map[string]*thrRun
}

func (r *thrRuns) get(id string) (*thrRun, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	run, ok := r.m[id]
	return run, ok
}

// drop forgets a run, removing the blobs it wrote if it did not commit.
func (s *Service) dropRun(run *thrRun, committed bool) {
	s.thr.mu.Lock()
	delete(s.thr.m, run.id)
	s.thr.mu.Unlock()
	if !committed && run.keyset != nil {
		if kk, ok := s.kinds[run.kind].(KeysetKind); ok {
			kk.RemoveBlobs(run.keyset.Digests())
		}
	}
	run.share.Wipe()
	// The other parties' Shamir shares of their secrets, too.
	s.thr.mu.Lock()
	for _, b := range run.private {
		clear(b)
	}
	s.thr.mu.Unlock()
}

// thrBegin opens a setup at a party.
type thrBegin struct {
	Run         string    `json:"run"`
	Coordinator string    `json:"coordinator"`
	Key         string    `json:"key"`
	Kind        string    `json:"kind"`
	Version     uint64    `json:"version"`
	Policy      Policy    `json:"policy"`
	CreatedAt   time.Time `json:"created_at"`
}

type thrMsg struct {
	Run  string `json:"run"`
	From int    `json:"from,omitempty"`
	// Digest: the manifest's SHA-256 (finish's answer, commit).
	Digest string `json:"digest,omitempty"`
	// Signature: finish's answer, the party's identity signature over
	// the run and its digest (finishWord). Signatures: commit, every
	// party's, by name: a party commits only a manifest every party
	// says it made, not on the coordinator's word.
	Signature  []byte            `json:"signature,omitempty"`
	Signatures map[string][]byte `json:"signatures,omitempty"`
}

// finishContext is the ML-DSA context of a party's word on the manifest
// a setup made.
const finishContext = "kmsd-threshold-manifest-v1"

func finishWord(run, digest string) []byte {
	return []byte("kmsd threshold manifest\n" + run + "\n" + digest)
}

// frames encodes a small JSON header and binary parts: the peer messages
// carry keysets, too large for base64 in JSON.
func frames(header any, parts ...[]byte) ([]byte, error) {
	h, err := json.Marshal(header)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	for _, p := range append([][]byte{h}, parts...) {
		b.Write(binary.BigEndian.AppendUint64(nil, uint64(len(p))))
		b.Write(p)
	}
	return b.Bytes(), nil
}

// unframe decodes frames into header and returns the parts (exactly
// nparts of them).
func unframe(b []byte, header any, nparts int) ([][]byte, error) {
	var parts [][]byte
	for len(b) > 0 {
		if len(b) < 8 {
			return nil, Errorf(KindInvalid, "malformed peer message")
		}
		n := binary.BigEndian.Uint64(b)
		if n > uint64(len(b)-8) {
			return nil, Errorf(KindInvalid, "malformed peer message")
		}
		parts = append(parts, b[8:8+n])
		b = b[8+n:]
	}
	if len(parts) != nparts+1 {
		return nil, Errorf(KindInvalid, "malformed peer message: %d parts, want %d", len(parts)-1, nparts)
	}
	dec := json.NewDecoder(bytes.NewReader(parts[0]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(header); err != nil {
		return nil, Errorf(KindInvalid, "malformed peer message header")
	}
	return parts[1:], nil
}

// HandlePeer answers a protocol message from peer from (authenticated by
// the transport). The answer is what the transport sends back.
func (c Call) HandlePeer(ctx context.Context, from, op string, body []byte) ([]byte, error) {
	s := c.Service
	if s.peers == nil || !s.peers.Known(from) || from == s.peers.Self() {
		return nil, Errorf(KindPermissionDenied, "not a peer of this node")
	}
	switch op {
	case PeerPing:
		return frames(struct{}{})
	case PeerSetupBegin:
		var m thrBegin
		if _, err := unframe(body, &m, 0); err != nil {
			return nil, err
		}
		if m.Coordinator != from {
			return nil, Errorf(KindPermissionDenied, "peer %q opens a setup in the name of %q", from, clip(m.Coordinator, 64))
		}
		noteRun(c.rec, m.Run, m.Key, m.Version)
		return s.thrBeginAt(ctx, m)
	case PeerDecrypt:
		return c.partialFor(ctx, from, body)
	}
	var m thrMsg
	parts, err := unframe(body, &m, map[string]int{PeerSetupRound1: 1, PeerSetupShamir: 1, PeerSetupRound2: 1, PeerSetupFinish: 2, PeerSetupCommit: 0, PeerSetupAbort: 0}[op])
	if err != nil {
		return nil, err
	}
	run, ok := s.thr.get(m.Run)
	if !ok {
		return nil, Errorf(KindNotFound, "no setup %q in progress here (setups end after %s or when this node restarts)", clip(m.Run, 64), thrRunTTL)
	}
	noteRun(c.rec, run.id, run.key, run.version)
	if op == PeerSetupShamir {
		// From any party, each once: its share for this node.
		if m.From < 1 || m.From > len(run.policy.Threshold.Parties) || run.policy.Threshold.Parties[m.From-1] != from {
			return nil, Errorf(KindPermissionDenied, "peer %q sends a share as party %d", from, m.From)
		}
		s.thr.mu.Lock()
		defer s.thr.mu.Unlock()
		if _, dup := run.private[m.From]; dup {
			return nil, Errorf(KindAlreadyExists, "party %d's share was already received", m.From)
		}
		run.private[m.From] = bytes.Clone(parts[0])
		return frames(struct{}{})
	}
	if from != run.coordinator {
		return nil, Errorf(KindPermissionDenied, "only the coordinator %q runs setup %q", run.coordinator, run.id)
	}
	return s.thrStep(ctx, c.rec, run, op, m, parts)
}

// noteRun names the protocol run in the request's audit record.
func noteRun(rec *AuditRecord, run, key string, version uint64) {
	if rec != nil {
		rec.Run, rec.Key, rec.Version = run, key, version
	}
}

// thrBeginAt opens a setup at this node as a party, after this node's own
// checks: the key's state, the policy, its peers.
func (s *Service) thrBeginAt(ctx context.Context, m thrBegin) ([]byte, error) {
	if err := ValidateName(m.Key); err != nil {
		return nil, err
	}
	if len(m.Run) != 32 {
		return nil, Errorf(KindInvalid, "malformed run id")
	}
	kind, err := s.kinds.Lookup(m.Kind)
	if err != nil {
		return nil, err
	}
	_, ok := kind.(ThresholdKind)
	if !ok || m.Policy.Threshold == nil {
		return nil, Errorf(KindInvalid, "not a threshold setup")
	}
	p, err := s.checkPolicy(kind, m.Policy)
	if err != nil {
		return nil, err
	}
	if !slices.Contains(p.Threshold.Parties, m.Coordinator) {
		return nil, Errorf(KindInvalid, "the coordinator is not a party")
	}
	// Version 1 of a new key, or the next version of a threshold key this
	// node holds a share of, with the same parties.
	k, err := s.store.GetKey(ctx, m.Key)
	switch {
	case errors.Is(err, ErrNotFound):
		if m.Version != 1 {
			return nil, Errorf(KindFailedPrecondition, "key %q does not exist here", m.Key)
		}
	case err != nil:
		return nil, asUnavailable("store", err)
	default:
		if m.Version == 1 {
			return nil, Errorf(KindAlreadyExists, "key %q already exists", m.Key)
		}
		if k.Kind != m.Kind || !sameThreshold(k.Policy.Threshold, p.Threshold) || k.Latest+1 != m.Version {
			return nil, Errorf(KindFailedPrecondition, "key %q here is not the threshold key of this setup, or not at version %d", m.Key, m.Version-1)
		}
		// The key material's parameters are this node's policy's, not
		// the coordinator's word (which could weaken them at rotation).
		if !bytes.Equal(k.Policy.Params, p.Params) || !slices.Equal(k.Policy.Rotations, p.Rotations) || k.Policy.Conjugation != p.Conjugation || k.Policy.Relinearization != p.Relinearization {
			return nil, Errorf(KindFailedPrecondition, "the setup's parameters, rotations or relinearization differ from key %q's policy here: its administrators align the policies first", m.Key)
		}
	}
	s.thr.mu.Lock()
	defer s.thr.mu.Unlock()
	now := s.clock.Now()
	for id, r := range s.thr.m {
		if now.After(r.expires) {
			delete(s.thr.m, id)
			go s.dropRun(r, false)
		}
	}
	byCoordinator := 0
	for _, r := range s.thr.m {
		if r.coordinator == m.Coordinator {
			byCoordinator++
		}
	}
	if len(s.thr.m) >= maxThrRunsActive || byCoordinator >= maxThrRunsPerPeer {
		return nil, Errorf(KindExhausted, "threshold setups already in progress here (%d in all, %d from %q; at most %d and %d)", len(s.thr.m), byCoordinator, m.Coordinator, maxThrRunsActive, maxThrRunsPerPeer)
	}
	if _, dup := s.thr.m[m.Run]; dup {
		return nil, Errorf(KindAlreadyExists, "setup %q already in progress", m.Run)
	}
	run := &thrRun{id: m.Run, coordinator: m.Coordinator, key: m.Key, kind: m.Kind, version: m.Version, policy: p, createdAt: m.CreatedAt.UTC(),
		self: slices.Index(p.Threshold.Parties, s.peers.Self()) + 1, private: map[int][]byte{}, expires: now.Add(thrRunTTL)}
	contribution := make([]byte, 32)
	if _, err := io.ReadFull(s.rand, contribution); err != nil {
		return nil, Wrap(KindInternal, "randomness", err)
	}
	run.contribution = contribution
	s.thr.m[m.Run] = run
	return frames(struct{}{}, contribution)
}

// thrStep runs one step of a setup at this party.
func (s *Service) thrStep(ctx context.Context, rec *AuditRecord, run *thrRun, op string, m thrMsg, parts [][]byte) ([]byte, error) {
	// One step of a run at a time: a step sent twice at once would race
	// on the run's state.
	if !run.step.TryLock() {
		return nil, Errorf(KindFailedPrecondition, "setup %q is running another step", run.id)
	}
	defer run.step.Unlock()
	tk := s.kinds[run.kind].(ThresholdKind)
	switch op {
	case PeerSetupAbort:
		s.dropRun(run, false)
		return frames(struct{}{})
	case PeerSetupRound1:
		n := len(run.policy.Threshold.Parties)
		if run.setup != nil || len(parts[0]) != 32*n {
			return nil, Errorf(KindFailedPrecondition, "round 1 of setup %q: out of order or malformed", run.id)
		}
		// The CRS seed from every party's contribution, this one's
		// among them at its place: the coordinator does not choose it.
		if !bytes.Equal(parts[0][32*(run.self-1):32*run.self], run.contribution) {
			return nil, Errorf(KindFailedPrecondition, "round 1 of setup %q: the CRS does not include this party's contribution", run.id)
		}
		var crs [32]byte
		copy(crs[:], crsSeed(run.id, parts[0]))
		setup, err := tk.NewThresholdSetup(run.policy, run.self, crs)
		if err != nil {
			return nil, Wrap(KindInternal, "threshold setup", err)
		}
		run.setup = setup
		b, private, err := setup.Round1()
		if err != nil {
			return nil, Wrap(KindInternal, "threshold round 1", err)
		}
		defer func() {
			for _, sh := range private {
				clear(sh)
			}
		}()
		// Each other party's Shamir share goes to it directly.
		for j, sh := range private {
			msg, err := frames(thrMsg{Run: run.id, From: run.self}, sh)
			if err != nil {
				return nil, err
			}
			_, err = s.peers.Send(ctx, run.policy.Threshold.Parties[j-1], PeerSetupShamir, msg)
			clear(msg)
			if err != nil {
				return nil, asUnavailable(fmt.Sprintf("send party %d its share", j), err)
			}
		}
		return frames(struct{}{}, b)
	case PeerSetupRound2:
		if run.setup == nil {
			return nil, Errorf(KindFailedPrecondition, "round 2 of setup %q before round 1", run.id)
		}
		b, err := run.setup.Round2(parts[0])
		if err != nil {
			return nil, Errorf(KindInvalid, "threshold round 2: %v", err)
		}
		return frames(struct{}{}, b)
	case PeerSetupFinish:
		if run.setup == nil || run.keyset != nil {
			return nil, Errorf(KindFailedPrecondition, "finish of setup %q: out of order", run.id)
		}
		s.thr.mu.Lock()
		private := run.private
		s.thr.mu.Unlock()
		ks, share, err := run.setup.Finish(ctx, parts[0], parts[1], private)
		if err != nil {
			return nil, Errorf(KindInvalid, "threshold finish: %v", err)
		}
		run.keyset, run.share = ks, share
		man, err := buildThresholdManifest(run, ks)
		if err != nil {
			return nil, Wrap(KindInternal, "manifest", err)
		}
		run.manifest = man
		sum := sha256.Sum256(man)
		digest := "sha256:" + hex.EncodeToString(sum[:])
		sig, _, err := s.SignAsIdentity(ctx, finishWord(run.id, digest), []byte(finishContext))
		if err != nil {
			return nil, err
		}
		return frames(thrMsg{Run: run.id, Digest: digest, Signature: sig})
	case PeerSetupCommit:
		sum := sha256.Sum256(run.manifest)
		if run.keyset == nil || m.Digest != "sha256:"+hex.EncodeToString(sum[:]) {
			return nil, Errorf(KindFailedPrecondition, "commit of setup %q: not finished, or another manifest", run.id)
		}
		// Every party's word on this very manifest (this node's own
		// included), each by its pinned identity key.
		for _, party := range run.policy.Threshold.Parties {
			sig := m.Signatures[party]
			if len(sig) == 0 || len(sig) > 8<<10 || !s.peers.Verify(party, finishWord(run.id, m.Digest), []byte(finishContext), sig) {
				return nil, Errorf(KindFailedPrecondition, "commit of setup %q: party %q did not sign this manifest", run.id, clip(party, 64))
			}
		}
		if err := s.thrCommit(ctx, rec, run); err != nil {
			return nil, err
		}
		return frames(struct{}{})
	}
	return nil, Errorf(KindNotFound, "no peer operation %q", clip(op, 32))
}

func buildThresholdManifest(run *thrRun, ks *Keyset) ([]byte, error) {
	lit, err := json.Marshal(string(ks.Params))
	if err != nil {
		return nil, err
	}
	m := Manifest{Key: run.key, Version: run.version, Kind: run.kind, ParamsID: ks.ParamsID, Params: lit,
		PublicKey: ks.PublicKey, RelinearizationKey: ks.Relinearization, GaloisKeys: ks.Galois, CreatedAt: run.createdAt,
		Threshold: &ThresholdRef{Parties: run.policy.Threshold.Parties, T: run.policy.Threshold.T}}
	if m.GaloisKeys == nil {
		m.GaloisKeys = []GaloisRef{}
	}
	return json.Marshal(m)
}

// thrCommit seals the party's share and commits the version (a new key at
// version 1), with the request's audit record.
func (s *Service) thrCommit(ctx context.Context, rec *AuditRecord, run *thrRun) error {
	sig, by, err := s.SignAsIdentity(ctx, run.manifest, []byte(ManifestContext))
	if err != nil {
		return err
	}
	release := s.seals.enter()
	defer release()
	sealed, err := s.sealer.Seal(ctx, SealContext{Key: run.key, Version: run.version, Kind: run.kind}, run.share)
	if err != nil {
		return asUnavailable("seal", err)
	}
	v := Version{Number: run.version, State: StateEnabled, CreatedAt: run.createdAt, Sealed: sealed, Manifest: run.manifest, ManifestSig: sig, ManifestSigBy: by, Blobs: run.keyset.Digests()}
	if run.version == 1 {
		k := &Key{Name: run.key, Kind: run.kind, Policy: run.policy, CreatedAt: v.CreatedAt, Primary: 1, Latest: 1, MinDecryptionVersion: 1, LatestCreatedAt: v.CreatedAt}
		err = s.store.CreateKey(ctx, k, &v, auditFor(rec, run.key, 1))
		if errors.Is(err, ErrAlreadyExists) {
			err = Errorf(KindAlreadyExists, "key %q already exists", run.key)
		}
	} else {
		err = s.update(ctx, run.key, func(tx KeyTx) ([]*AuditRecord, error) {
			k := tx.Key()
			if k.Latest+1 != run.version {
				return nil, Errorf(KindFailedPrecondition, "key %q changed during the setup", run.key)
			}
			if err := tx.AddVersion(v.Clone()); err != nil {
				return nil, err
			}
			k.Primary, k.LatestCreatedAt = run.version, v.CreatedAt
			return auditFor(rec, run.key, run.version), nil
		})
	}
	if err != nil {
		if KindOf(err) == KindInternal {
			err = asUnavailable("store", err)
		}
		s.dropRun(run, false)
		return err
	}
	s.dropRun(run, true)
	return nil
}

// ThresholdSetupResult is a coordinated setup's outcome.
type ThresholdSetupResult struct {
	Run     string
	Version uint64
	// BytesSent and BytesReceived are this node's protocol traffic.
	BytesSent, BytesReceived int64
}

// CreateThresholdKey creates a threshold key, this node coordinating: every
// party (this one included) runs the setup and commits version 1 with the
// same manifest, or none does.
func (c Call) CreateThresholdKey(ctx context.Context, name, kindName string, p Policy) (*ThresholdSetupResult, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	return c.runThresholdSetup(ctx, name, kindName, 1, p)
}

// RotateThreshold makes the next version of a threshold key by a new
// setup among its parties, this node coordinating.
func (c Call) RotateThreshold(ctx context.Context, name string) (*ThresholdSetupResult, error) {
	s := c.Service
	k, err := s.getKey(ctx, name)
	if err != nil {
		return nil, err
	}
	if k.Policy.Threshold == nil {
		return nil, Errorf(KindFailedPrecondition, "key %q is not a threshold key", name)
	}
	return c.runThresholdSetup(ctx, name, k.Kind, k.Latest+1, k.Policy)
}

// runThresholdSetup coordinates a setup of version n of key name.
func (c Call) runThresholdSetup(ctx context.Context, name, kindName string, n uint64, p Policy) (*ThresholdSetupResult, error) {
	s := c.Service
	kind, err := s.kinds.Lookup(kindName)
	if err != nil {
		return nil, err
	}
	tk, ok := kind.(ThresholdKind)
	if !ok {
		return nil, Errorf(KindInvalid, "threshold applies to the HE kinds (ckks, bgv)")
	}
	if p, err = s.checkPolicy(kind, p); err != nil {
		return nil, err
	}
	if p.Threshold == nil {
		return nil, Errorf(KindInvalid, "not a threshold policy")
	}
	idb := make([]byte, 16)
	if _, err := io.ReadFull(s.rand, idb); err != nil {
		return nil, Wrap(KindInternal, "randomness", err)
	}
	res := &ThresholdSetupResult{Run: hex.EncodeToString(idb), Version: n}
	noteRun(c.rec, res.Run, name, n)
	parties := p.Threshold.Parties
	self := s.peers.Self()
	// send runs op at party j (this node through its own handler).
	send := func(ctx context.Context, party, op string, body []byte) ([]byte, error) {
		res.BytesSent += int64(len(body))
		var out []byte
		var err error
		if party == self {
			out, err = c.handleOwn(ctx, op, body)
		} else {
			out, err = s.peers.Send(ctx, party, op, body)
		}
		res.BytesReceived += int64(len(out))
		if err != nil {
			return nil, fmt.Errorf("%s at %s: %w", op, party, err)
		}
		return out, nil
	}
	// all runs op at every party at once and returns their answers' parts.
	all := func(op string, body []byte, nparts int) ([][][]byte, error) {
		out := make([][][]byte, len(parties))
		errs := make([]error, len(parties))
		var wg sync.WaitGroup
		for i, party := range parties {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b, err := send(ctx, party, op, body)
				if err == nil {
					var h thrMsg
					out[i], err = unframe(b, &h, nparts)
					if err == nil && op == PeerSetupFinish {
						out[i] = [][]byte{[]byte(h.Digest), h.Signature}
					}
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		return out, errors.Join(errs...)
	}
	abort := func(cause error) error {
		body, _ := frames(thrMsg{Run: res.Run})
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		for _, party := range parties {
			_, _ = send(actx, party, PeerSetupAbort, body)
		}
		s.log.Warn("threshold setup aborted", "run", res.Run, "key", name, "version", n, "err", cause)
		if KindOf(cause) != KindInternal {
			return cause
		}
		return Errorf(KindUnavailable, "the threshold setup of %q failed and was abandoned at every party: %s", name, cause.Error())
	}
	begin, err := frames(thrBegin{Run: res.Run, Coordinator: self, Key: name, Kind: kindName, Version: n, Policy: p, CreatedAt: s.clock.Now().UTC().Truncate(time.Second)})
	if err != nil {
		return nil, Wrap(KindInternal, "setup", err)
	}
	contribs, err := all(PeerSetupBegin, begin, 1)
	if err != nil {
		return nil, abort(err)
	}
	// The CRS seed: no party chooses it alone (each party derives it
	// from every contribution, checking its own).
	var seeds []byte
	for _, c := range contribs {
		if len(c[0]) != 32 {
			return nil, abort(Errorf(KindInvalid, "a malformed CRS contribution"))
		}
		seeds = append(seeds, c[0]...)
	}
	r1body, _ := frames(thrMsg{Run: res.Run}, seeds)
	r1, err := all(PeerSetupRound1, r1body, 1)
	if err != nil {
		return nil, abort(err)
	}
	agg1, err := tk.AggregateRound1(p, firstParts(r1))
	if err != nil {
		return nil, abort(Errorf(KindInvalid, "round 1: %v", err))
	}
	r2body, _ := frames(thrMsg{Run: res.Run}, agg1)
	r2, err := all(PeerSetupRound2, r2body, 1)
	if err != nil {
		return nil, abort(err)
	}
	agg2, err := tk.AggregateRound2(p, firstParts(r2))
	if err != nil {
		return nil, abort(Errorf(KindInvalid, "round 2: %v", err))
	}
	fbody, _ := frames(thrMsg{Run: res.Run}, agg1, agg2)
	digests, err := all(PeerSetupFinish, fbody, 0)
	if err != nil {
		return nil, abort(err)
	}
	want := string(digests[0][0])
	for i, d := range digests {
		if string(d[0]) != want {
			return nil, abort(Errorf(KindInternal, "party %s made another manifest than party %s", parties[i], parties[0]))
		}
	}
	sigs := map[string][]byte{}
	for i, d := range digests {
		sigs[parties[i]] = d[1]
	}
	cbody, _ := frames(thrMsg{Run: res.Run, Digest: want, Signatures: sigs})
	if _, err := all(PeerSetupCommit, cbody, 0); err != nil {
		// Some parties may have committed: the key is then unusable
		// until every party holds its share (README: Threshold keys).
		return nil, Errorf(KindUnavailable, "the threshold setup %s of %q committed at some parties only: %v", res.Run, name, err)
	}
	return res, nil
}

// handleOwn runs a protocol step at this node for its own coordination
// (the transport is skipped: the coordinator is trusted by itself).
func (c Call) handleOwn(ctx context.Context, op string, body []byte) ([]byte, error) {
	s := c.Service
	if op == PeerSetupBegin {
		var m thrBegin
		if _, err := unframe(body, &m, 0); err != nil {
			return nil, err
		}
		return s.thrBeginAt(ctx, m)
	}
	var m thrMsg
	parts, err := unframe(body, &m, map[string]int{PeerSetupRound1: 1, PeerSetupRound2: 1, PeerSetupFinish: 2, PeerSetupCommit: 0, PeerSetupAbort: 0}[op])
	if err != nil {
		return nil, err
	}
	run, ok := s.thr.get(m.Run)
	if !ok {
		return nil, Errorf(KindNotFound, "no setup %q in progress", m.Run)
	}
	return s.thrStep(ctx, c.rec, run, op, m, parts)
}

// crsSeed is a setup's CRS seed from every party's contribution (32
// bytes each, in the parties' order).
func crsSeed(run string, contributions []byte) []byte {
	h := sha256.New()
	h.Write([]byte("kmsd-threshold-crs-v1\x00" + run))
	h.Write(contributions)
	return h.Sum(nil)
}

func firstParts(in [][][]byte) [][]byte {
	out := make([][]byte, len(in))
	for i, p := range in {
		out[i] = p[0]
	}
	return out
}

// GetKeyHeader returns a key's header (no versions).
func (s *Service) GetKeyHeader(ctx context.Context, name string) (*Key, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	return s.getKey(ctx, name)
}
