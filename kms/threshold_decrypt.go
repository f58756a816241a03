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

// thrPartial computes this node's partial decryption of d (checked by
// checkDecryption, threshold) and spends its budget in one transaction
// with rec.
func (s *Service) thrPartial(ctx context.Context, rec *AuditRecord, d *checkedDecryption, active []int, env *Envelope, target []byte, rs *RequesterSignature) ([]byte, error) {
	k, v := d.k, d.v
	if err := s.checkRequester(k, v.Number, env, target, rs); err != nil {
		return nil, err
	}
	self := slices.Index(k.Policy.Threshold.Parties, s.peers.Self()) + 1
	if !slices.Contains(active, self) {
		return nil, Errorf(KindInvalid, "this node (party %d) is not among the decrypting parties %v", self, active)
	}
	tk, ok := d.kind.(ThresholdKind)
	if !ok {
		return nil, Errorf(KindFailedPrecondition, "key %q of kind %s has no threshold decryption", k.Name, k.Kind)
	}
	share, err := s.sealer.Unseal(ctx, SealContext{Key: k.Name, Version: v.Number, Kind: k.Kind}, v.Sealed)
	if err != nil {
		return nil, asUnavailable("unseal", err)
	}
	out, err := tk.PartialDecrypt(share, v.Manifest, active, d.parsed, target, d.plan)
	share.Wipe()
	if err != nil {
		return nil, Errorf(KindInvalid, "partial decryption: %v", err)
	}
	if rec != nil {
		rec.Precision = d.plan.Precision
	}
	err = s.update(ctx, k.Name, func(tx KeyTx) ([]*AuditRecord, error) {
		if err := s.spendDecryption(tx, v.Number, d.st, fmt.Sprintf(" at node %q", s.peers.Self())); err != nil {
			return nil, err
		}
		return auditFor(rec, k.Name, v.Number), nil
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
	d, err := s.checkDecryption(ctx, c.rec, m.Key, m.Version, env, true, false, func(a *Attestation) (*Statement, error) {
		return s.verifyPeerAttestation(coordinator, a)
	})
	if err != nil {
		return nil, err
	}
	k := d.k
	if len(m.Active) != k.Policy.Threshold.T || !slices.IsSorted(m.Active) || !slices.Contains(m.Active, slices.Index(k.Policy.Threshold.Parties, coordinator)+1) {
		return nil, Errorf(KindInvalid, "the decrypting parties must be %d, ascending, the coordinator among them", k.Policy.Threshold.T)
	}
	out, err := s.thrPartial(ctx, c.rec, d, m.Active, env, parts[1], m.Requester)
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
	d, err := s.checkDecryption(ctx, c.rec, name, n, env, true, true, func(a *Attestation) (*Statement, error) { return s.VerifyAttestation(ctx, a) })
	if err != nil {
		return nil, err
	}
	k, v, plan := d.k, d.v, d.plan
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
				out.Partials[i], errs[i] = s.thrPartial(ctx, c.rec, d, active, env, target, rs)
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
