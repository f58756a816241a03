package kms

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/kms/wire"
)

// Threshold decryption: the coordinating node's checks and its partial,
// then t-1 other parties' (partialFor), each checking for itself.

// thrDecrypt asks a party for its partial decryption.
type thrDecrypt struct {
	Key       string              `json:"key"`
	Version   uint64              `json:"version"`
	Active    []int               `json:"active"`
	Requester *RequesterSignature `json:"requester,omitempty"`
	// Run names the decryption in every party's audit record.
	Run string `json:"run"`
}

// ThresholdDecryption is what the requester combines: the partial
// decryptions of the parties active (their points, ascending), in that
// order, and the CKKS precision the flooding leaves.
type ThresholdDecryption struct {
	Active    []int
	Parties   []string
	Partials  [][]byte
	Precision int
	Version   uint64
}

// thrPrepare runs this node's checks of a decryption of env by version n
// of threshold key name (the same as for a decryption: provenance,
// parameters, policy, budget) and returns what the partial decryption
// needs. verify checks the attestation (against this node's identity, or
// the coordinator's).
func (s *Service) thrPrepare(ctx context.Context, name string, n uint64, env *Envelope, verify func(*Attestation) (*Statement, error)) (*Key, *Version, ThresholdKind, any, DecryptPlan, *Statement, error) {
	fail := func(err error) (*Key, *Version, ThresholdKind, any, DecryptPlan, *Statement, error) {
		return nil, nil, nil, nil, DecryptPlan{}, nil, err
	}
	if err := ValidateName(name); err != nil {
		return fail(err)
	}
	k, v, kind, err := s.usable(ctx, name, n, OpDecrypt)
	if err != nil {
		return fail(err)
	}
	tk, ok := kind.(ThresholdKind)
	dk, ok2 := kind.(DecryptingKind)
	if !ok || !ok2 || k.Policy.Threshold == nil || v.Manifest == nil {
		return fail(Errorf(KindFailedPrecondition, "key %q is not a threshold key", name))
	}
	var m Manifest
	if err := json.Unmarshal(v.Manifest, &m); err != nil {
		return fail(Wrap(KindInternal, "manifest", err))
	}
	if err := env.MatchVersion(name, v.Number, m.ParamsID); err != nil {
		return fail(err)
	}
	parsed, err := dk.ParseCiphertext(v.Manifest, env)
	if err != nil {
		return fail(err)
	}
	if env.Attestation == nil {
		return fail(Errorf(KindInvalid, "the ciphertext has no attestation: kmsd decrypts only attested inputs and results computed from them"))
	}
	st, err := verify(env.Attestation)
	if err != nil {
		return fail(err)
	}
	if err := st.Covers(env); err != nil {
		return fail(err)
	}
	if err := sourcesDecryptable(k, st); err != nil {
		return fail(err)
	}
	prec := k.Policy.DecryptLogPrecision
	if prec == 0 {
		prec = DefaultDecryptLogPrecision
	}
	plan, err := dk.DecryptPlan(v.Manifest, parsed, st.NoiseLog2, EffectiveDecryptBudget(k.Policy.DecryptBudget), prec)
	if err != nil {
		return fail(err)
	}
	return k, v, tk, parsed, plan, st, nil
}

// thrPartial computes this node's partial decryption and spends its
// budget in one transaction with rec.
func (s *Service) thrPartial(ctx context.Context, rec *AuditRecord, k *Key, v *Version, tk ThresholdKind, parsed any, plan DecryptPlan, st *Statement, active []int, env *Envelope, target []byte, rs *RequesterSignature) ([]byte, error) {
	if err := s.checkRequester(k, v.Number, env, target, rs); err != nil {
		return nil, err
	}
	self := slices.Index(k.Policy.Threshold.Parties, s.peers.Self()) + 1
	if !slices.Contains(active, self) {
		return nil, Errorf(KindInvalid, "this node (party %d) is not among the decrypting parties %v", self, active)
	}
	share, err := s.sealer.Unseal(ctx, SealContext{Key: k.Name, Version: v.Number, Kind: k.Kind}, v.Sealed)
	if err != nil {
		return nil, asUnavailable("unseal", err)
	}
	out, err := tk.PartialDecrypt(share, v.Manifest, active, parsed, target, plan)
	share.Wipe()
	if err != nil {
		return nil, Errorf(KindInvalid, "partial decryption: %v", err)
	}
	if rec != nil {
		rec.Precision = plan.Precision
		noteAttestation(rec, st)
	}
	err = s.update(ctx, k.Name, func(tx KeyTx) ([]*AuditRecord, error) {
		k := tx.Key()
		tv, err := tx.Version(v.Number)
		if err != nil {
			return nil, err
		}
		if _, err := transition(k, tv, ActUse, s.clock.Now()); err != nil {
			return nil, err
		}
		if err := sourcesDecryptable(k, st); err != nil {
			return nil, err
		}
		b := EffectiveDecryptBudget(k.Policy.DecryptBudget)
		if tv.Decryptions >= b {
			return nil, Errorf(KindExhausted, "the decryption budget of version %d of key %q (%d) is spent at node %q: rotate the key", tv.Number, k.Name, b, s.peers.Self())
		}
		tv.Decryptions++
		for _, src := range st.Sources {
			sv, err := tx.Version(src)
			if err != nil {
				return nil, err
			}
			if sv.Decryptions >= b {
				return nil, Errorf(KindExhausted, "the ciphertext was re-keyed from version %d, whose decryption budget is spent", src)
			}
			sv.Decryptions++
		}
		return auditFor(rec, k.Name, tv.Number), nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// partialFor answers a coordinator's request for this node's partial
// decryption: the node checks the ciphertext, its attestation (signed by
// the coordinator's identity key) and its own policy and budget.
func (c Call) partialFor(ctx context.Context, coordinator string, body []byte) ([]byte, error) {
	s := c.Service
	var m thrDecrypt
	parts, err := unframe(body, &m, 2)
	if err != nil {
		return nil, err
	}
	if len(m.Run) != 32 {
		return nil, Errorf(KindInvalid, "malformed run id")
	}
	noteRun(c.rec, m.Run, m.Key, m.Version)
	limit, err := s.MaxCiphertextSize(ctx, m.Key, m.Version)
	if err != nil {
		return nil, err
	}
	env, err := ParseEnvelope(parts[0], int(limit))
	if err != nil {
		return nil, err
	}
	k, v, tk, parsed, plan, st, err := s.thrPrepare(ctx, m.Key, m.Version, env, func(a *Attestation) (*Statement, error) {
		return s.verifyPeerAttestation(coordinator, a)
	})
	if err != nil {
		return nil, err
	}
	if len(m.Active) != k.Policy.Threshold.T || !slices.IsSorted(m.Active) || !slices.Contains(m.Active, slices.Index(k.Policy.Threshold.Parties, coordinator)+1) {
		return nil, Errorf(KindInvalid, "the decrypting parties must be %d, ascending, the coordinator among them", k.Policy.Threshold.T)
	}
	out, err := s.thrPartial(ctx, c.rec, k, v, tk, parsed, plan, st, m.Active, env, parts[1], m.Requester)
	if err != nil {
		return nil, err
	}
	return frames(struct{}{}, out)
}

// verifyPeerAttestation checks an attestation signed by a peer's identity
// key (the coordinator that attested it).
func (s *Service) verifyPeerAttestation(peer string, a *Attestation) (*Statement, error) {
	if a == nil || len(a.Payload) == 0 || len(a.Payload) > 64<<10 || len(a.Signature) == 0 || len(a.Signature) > 8<<10 {
		return nil, Errorf(KindInvalid, "the attestation is malformed")
	}
	if !s.peers.Verify(peer, a.Payload, []byte(AttestationContext), a.Signature) {
		return nil, Errorf(KindInvalid, "the attestation's signature does not verify with the identity key of %q, the node that asks", peer)
	}
	dec := json.NewDecoder(bytes.NewReader(a.Payload))
	dec.DisallowUnknownFields()
	var st Statement
	if err := dec.Decode(&st); err != nil || (st.Type != StatementInput && st.Type != StatementEvaluation) {
		return nil, Errorf(KindInvalid, "the attestation's statement is malformed")
	}
	return &st, nil
}

// ThresholdDecrypt coordinates a decryption of env with version n of
// threshold key name for the requester's public key target: this node's
// own checks and partial, then t-1 more from the first parties that
// answer a ping, each checking for itself. Fewer than t parties reachable
// is KindUnavailable naming the missing ones.
//
// rs is the requester's signature, which every party checks when the
// key's policy names requesters.
func (c Call) ThresholdDecrypt(ctx context.Context, name string, n uint64, env *Envelope, target []byte, rs *RequesterSignature) (*ThresholdDecryption, error) {
	s := c.Service
	if s.peers == nil {
		return nil, Errorf(KindFailedPrecondition, "this kmsd has no peers: it holds no threshold key")
	}
	k, v, tk, parsed, plan, st, err := s.thrPrepare(ctx, name, n, env, func(a *Attestation) (*Statement, error) {
		st, err := s.VerifyAttestation(ctx, a)
		if err == nil {
			err = s.vouchersActive(ctx, st)
		}
		return st, err
	})
	if err != nil {
		return nil, err
	}
	noteAttestation(c.rec, st)
	tp := k.Policy.Threshold
	self := s.peers.Self()
	// Who answers: this node and the first others to answer a ping.
	pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	alive := map[string]bool{self: true}
	var mu sync.Mutex
	var wg sync.WaitGroup
	ping, _ := frames(struct{}{})
	for _, p := range tp.Parties {
		if p == self {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.peers.Send(pctx, p, PeerPing, ping); err == nil {
				mu.Lock()
				alive[p] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	cancel()
	var active []int
	var missing []string
	others := 0
	for i, p := range tp.Parties {
		switch {
		case p == self:
			active = append(active, i+1)
		case alive[p] && others < tp.T-1:
			active = append(active, i+1)
			others++
		case !alive[p]:
			missing = append(missing, p)
		}
	}
	if len(active) < tp.T {
		return nil, Errorf(KindUnavailable, "%d of the %d parties needed answer: %s did not (a threshold key decrypts with %d of %v)", len(active), tp.T, joinNames(missing), tp.T, tp.Parties)
	}
	slices.Sort(active)
	envb, err := json.Marshal(env)
	if err != nil {
		return nil, Wrap(KindInternal, "envelope", err)
	}
	idb := make([]byte, 16)
	if _, err := io.ReadFull(s.rand, idb); err != nil {
		return nil, Wrap(KindInternal, "randomness", err)
	}
	run := hex.EncodeToString(idb)
	noteRun(c.rec, run, name, v.Number)
	body, err := frames(thrDecrypt{Key: name, Version: v.Number, Active: active, Requester: rs, Run: run}, envb, target)
	if err != nil {
		return nil, Wrap(KindInternal, "decrypt", err)
	}
	// Each party floods its own answer: the requester's result carries T
	// floods, sqrt(T) times one (half a bit per doubling of T).
	prec := plan.Precision
	if prec > 0 {
		prec = max(prec-int(math.Ceil(math.Log2(float64(tp.T))/2)), 0)
	}
	out := &ThresholdDecryption{Active: active, Partials: make([][]byte, len(active)), Precision: prec, Version: v.Number}
	errs := make([]error, len(active))
	for i, a := range active {
		party := tp.Parties[a-1]
		out.Parties = append(out.Parties, party)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if party == self {
				out.Partials[i], errs[i] = s.thrPartial(ctx, c.rec, k, v, tk, parsed, plan, st, active, env, target, rs)
				return
			}
			b, err := s.peers.Send(ctx, party, PeerDecrypt, body)
			if err == nil {
				var h struct{}
				var parts [][]byte
				if parts, err = unframe(b, &h, 1); err == nil {
					out.Partials[i] = parts[0]
				}
			}
			if err != nil {
				errs[i] = err
			}
		}()
	}
	wg.Wait()
	// Every refusal, each party's own words (the first refusal's kind).
	var msgs []string
	kind := KindInternal
	for i, err := range errs {
		if err == nil {
			continue
		}
		if kind == KindInternal {
			kind = KindOf(err)
		}
		msgs = append(msgs, "party "+out.Parties[i]+": "+strings.TrimPrefix(PublicMessage(err), "peer "+out.Parties[i]+": "))
	}
	if len(msgs) > 0 {
		if kind == KindInternal {
			kind = KindUnavailable
		}
		return nil, Errorf(kind, "%s", strings.Join(msgs, "; "))
	}
	return out, nil
}

func joinNames(names []string) string {
	out := ""
	for i, n := range names {
		if i > 0 {
			out += ", "
		}
		out += fmt.Sprintf("%q", n)
	}
	return out
}

// requesterKey decodes a policy's requester public key.
func requesterKey(b64 string) (*mldsa65.PublicKey, error) {
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, err
	}
	var pub mldsa65.PublicKey
	if err := pub.UnmarshalBinary(raw); err != nil {
		return nil, err
	}
	return &pub, nil
}

// checkRequester verifies, when the key's policy names requesters, that
// one of them signed this request (key, version, ciphertext, target key)
// within requesterWindow of this node's clock.
func (s *Service) checkRequester(k *Key, n uint64, env *Envelope, target []byte, rs *RequesterSignature) error {
	req := k.Policy.Threshold.Requesters
	if len(req) == 0 {
		return nil
	}
	if rs == nil {
		return Errorf(KindPermissionDenied, "key %q decrypts only for its requesters: the request must be signed by one of their keys (policy.threshold.requesters)", k.Name)
	}
	if rs.Index < 0 || rs.Index >= len(req) || len(rs.Signature) == 0 || len(rs.Signature) > 8<<10 {
		return Errorf(KindPermissionDenied, "the requester's signature names no requester of key %q", k.Name)
	}
	if s.clock.Now().Sub(time.Unix(rs.Time, 0)).Abs() > requesterWindow {
		return Errorf(KindPermissionDenied, "the requester's signature is more than %s from this node's clock", requesterWindow)
	}
	pub, err := requesterKey(req[rs.Index])
	if err != nil {
		return Wrap(KindInternal, "requester key", err)
	}
	if !mldsa65.Verify(pub, wire.ThresholdRequestMessage(k.Name, n, env.Digest(), target, rs.Time), []byte(wire.ThresholdRequestContext), rs.Signature) {
		return Errorf(KindPermissionDenied, "the request is not signed by requester %d of key %q (over this ciphertext and this target key)", rs.Index, k.Name)
	}
	return nil
}
