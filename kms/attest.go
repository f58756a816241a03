package kms

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"slices"
	"time"

	"github.com/kmsd-project/kmsd/kms/wire"
)

// Attestations give HE ciphertexts provenance. kmsd decrypts only a
// ciphertext whose envelope carries an attestation it signed itself: a
// statement, signed with the service's ML-DSA-65 identity key, that binds
// the envelope's digest to the token that vouched for it and how the
// ciphertext came to be:
//
//   - "input": an encryption by a data owner (an encryptor token) under the
//     version's public key;
//   - "evaluation": the result of an evaluation (an evaluator token, such as
//     kmsd-mcp's) of an operation on attested inputs, whose statements it
//     names.
//
// Each statement also carries kmsd's bound on the ciphertext's noise, from
// which decryption sizes its noise flooding. A ciphertext someone built
// (the chosen ciphertexts that recover a secret key from decryptions) has
// no attestation, or one that names whoever vouched for it.

// MaxAttestInputs is how many input attestations one evaluation may name.
const MaxAttestInputs = wire.MaxAttestInputs

// AttestRequest is what a token asks kmsd to vouch for: the digest of an
// envelope (Envelope.Digest) with its level, scale and slots, and, for an
// evaluation, the attestations of its inputs and the declared shape of its
// operation.
type AttestRequest struct {
	Digest        string
	Level         int
	Scale         float64
	Slots         int
	Op            string
	Inputs        []*Attestation
	Amplification float64
	KeySwitches   int
}

var (
	digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	opRE     = regexp.MustCompile(`^[a-z][a-z0-9_.-]{0,63}$`)
)

// Attest vouches for a ciphertext of version n of key name on behalf of
// p: an input (op "encrypt", an encryptor token) or an evaluation (any
// other op, an evaluator token, with the attestations of its inputs, all
// for the same version). The statement is signed with the identity key; the
// request's audit record names it.
func (c Call) Attest(ctx context.Context, p *Principal, name string, n uint64, req AttestRequest) (*Attestation, *Statement, error) {
	s := c.Service
	if err := ValidateName(name); err != nil {
		return nil, nil, err
	}
	if n == 0 {
		return nil, nil, Errorf(KindInvalid, "name the version the ciphertext is under")
	}
	switch {
	case !digestRE.MatchString(req.Digest):
		return nil, nil, Errorf(KindInvalid, "digest must be sha256:<64 lower-case hex digits> (the envelope's digest)")
	case req.Level < 0 || req.Level > 64:
		return nil, nil, Errorf(KindInvalid, "level %d is out of range", req.Level)
	case !(req.Scale >= 1) || math.IsInf(req.Scale, 0):
		return nil, nil, Errorf(KindInvalid, "scale must be a finite number of at least 1")
	case req.Slots < 1 || req.Slots > 1<<16:
		return nil, nil, Errorf(KindInvalid, "slots must be from 1 to 65536")
	case !opRE.MatchString(req.Op):
		return nil, nil, Errorf(KindInvalid, "op must be a lower-case name of at most 64 characters (\"encrypt\" for an input)")
	}
	st := &Statement{Key: name, Version: n, Digest: req.Digest, Level: req.Level, Scale: req.Scale, Slots: req.Slots,
		By: p.TokenID, Role: p.Role, Op: req.Op, Issued: s.clock.Now().UTC().Format(time.RFC3339Nano)}
	if req.Op == "encrypt" {
		if err := p.Authorize(PermAttestInput, name); err != nil {
			return nil, nil, err
		}
		if len(req.Inputs) > 0 || req.Amplification != 0 || req.KeySwitches != 0 {
			return nil, nil, Errorf(KindInvalid, "an input (op \"encrypt\") takes no inputs, amplification or key_switches")
		}
		st.Type = StatementInput
	} else {
		if err := p.Authorize(PermAttestEvaluation, name); err != nil {
			return nil, nil, err
		}
		switch {
		case len(req.Inputs) == 0:
			return nil, nil, Errorf(KindInvalid, "an evaluation names the attestations of its inputs: kmsd vouches only for results computed from attested inputs")
		case len(req.Inputs) > MaxAttestInputs:
			return nil, nil, Errorf(KindInvalid, "an evaluation takes at most %d inputs", MaxAttestInputs)
		case !(req.Amplification >= 1) || req.Amplification > wire.MaxAmplification:
			return nil, nil, Errorf(KindInvalid, "amplification must be from 1 to 2^40: the largest factor the operation multiplies an input's noise by (the sum of the absolute weights of an output)")
		case req.KeySwitches < 0 || req.KeySwitches > wire.MaxKeySwitches:
			return nil, nil, Errorf(KindInvalid, "key_switches must be from 0 to 65536")
		}
		st.Type, st.Amplification, st.KeySwitches = StatementEvaluation, req.Amplification, req.KeySwitches
	}
	if req.Op == OpRekey && (len(req.Inputs) != 1 || req.Amplification != 1 || req.KeySwitches != 1) {
		return nil, nil, Errorf(KindInvalid, "a re-keying (op \"rekey\") has one input, amplification 1 and one key switch")
	}
	k, v, kind, err := s.usable(ctx, name, n, OpDecrypt)
	if err != nil {
		return nil, nil, err
	}
	dk, ok := kind.(DecryptingKind)
	if !ok || v.Manifest == nil {
		return nil, nil, Errorf(KindFailedPrecondition, "key %q of kind %s does not decrypt", name, k.Kind)
	}
	var m Manifest
	if err := json.Unmarshal(v.Manifest, &m); err != nil {
		return nil, nil, Wrap(KindInternal, "manifest", err)
	}
	st.ParamsID = m.ParamsID
	var in []float64
	for i, a := range req.Inputs {
		ist, err := s.VerifyAttestation(ctx, a)
		if err == nil {
			err = s.vouchersActive(ctx, ist)
		}
		if KindOf(err) == KindInvalid {
			return nil, nil, Errorf(KindInvalid, "input %d: %s", i, PublicMessage(err))
		}
		if err != nil {
			return nil, nil, err // the store or the identity key: not the caller's mistake
		}
		if req.Op == OpRekey {
			if err := s.rekeyInput(ctx, k, n, ist, m.ParamsID); err != nil {
				return nil, nil, err
			}
		} else if ist.Key != name || ist.Version != n || ist.ParamsID != m.ParamsID {
			return nil, nil, Errorf(KindInvalid, "input %d is attested for key %q version %d, not %q version %d", i, ist.Key, ist.Version, name, n)
		}
		if ist.Level < req.Level {
			return nil, nil, Errorf(KindInvalid, "input %d is at level %d, below the result's level %d", i, ist.Level, req.Level)
		}
		st.Inputs = append(st.Inputs, InputRef{ID: ist.ID, Digest: ist.Digest, By: ist.By, Type: ist.Type})
		st.Sources = append(st.Sources, ist.Sources...)
		if req.Op == OpRekey {
			st.Sources = append(st.Sources, ist.Version)
		}
		in = append(in, ist.NoiseLog2)
	}
	slices.Sort(st.Sources)
	st.Sources = slices.Compact(st.Sources)
	if err := sourcesDecryptable(k, st); err != nil {
		return nil, nil, err
	}
	st.NoiseLog2, err = dk.NoiseBound(v.Manifest, req.Level, in, req.Amplification, req.KeySwitches)
	if err != nil {
		return nil, nil, err
	}
	id := make([]byte, 16)
	if _, err := s.rand.Read(id); err != nil {
		return nil, nil, Wrap(KindInternal, "attestation id", err)
	}
	st.ID = hex.EncodeToString(id)
	payload, err := json.Marshal(st)
	if err != nil {
		return nil, nil, Wrap(KindInternal, "statement", err)
	}
	sig, by, err := s.SignAsIdentity(ctx, payload, []byte(AttestationContext))
	if err != nil {
		return nil, nil, err
	}
	auditFor(c.rec, name, n)
	noteAttestation(c.rec, st)
	return &Attestation{Payload: payload, Signature: sig, SignedBy: by}, st, nil
}

// OpRekey is the op of an evaluation that re-keyed a ciphertext of an
// earlier version of the key into the attested version, with the switching
// key kmsd issued (SwitchingKey).
const OpRekey = "rekey"

// rekeyInput checks the input of a re-keying into version n of key k: an
// earlier version of the same key and parameters, not below
// min_decryption_version, that has a switching key to n.
func (s *Service) rekeyInput(ctx context.Context, k *Key, n uint64, ist *Statement, paramsID string) error {
	switch {
	case ist.Key != k.Name || ist.ParamsID != paramsID:
		return Errorf(KindInvalid, "the input of a re-keying is attested for key %q (parameters %s), not %q (%s)", ist.Key, ist.ParamsID, k.Name, paramsID)
	case ist.Version >= n:
		return Errorf(KindInvalid, "a re-keying goes from an earlier version: the input is under version %d, the result under %d", ist.Version, n)
	case ist.Version < k.MinDecryptionVersion:
		return Errorf(KindInvalid, "the input is under version %d, below the key's min_decryption_version (%d): it is not to be decrypted, nor re-keyed", ist.Version, k.MinDecryptionVersion)
	}
	_, from, err := s.resolve(ctx, k.Name, ist.Version)
	if err != nil {
		return err
	}
	// kmsd does not decrypt a ciphertext of a disabled, scheduled or
	// destroyed version: it does not vouch for its re-keying either (a
	// switching key issued earlier would otherwise carry any ciphertext
	// of a retired or shredded version into one kmsd decrypts).
	if _, err := transition(k, from, ActUse, s.clock.Now()); err != nil {
		return Errorf(KindInvalid, "the input of a re-keying is under version %d of key %q, which cannot be used: %s", ist.Version, k.Name, PublicMessage(err))
	}
	if res, ok, err := switchingResult(from, n); err != nil {
		return err
	} else if !ok || res.Switching == nil {
		return Errorf(KindInvalid, "version %d of key %q has no switching key to version %d: kmsd issued none, so no re-keying can have used one", ist.Version, k.Name, n)
	}
	return nil
}

// sourcesDecryptable refuses a statement re-keyed from a version below the
// key's min_decryption_version: raising it retires the old versions'
// ciphertexts, re-keyed or not.
func sourcesDecryptable(k *Key, st *Statement) error {
	for _, src := range st.Sources {
		if src < k.MinDecryptionVersion {
			return Errorf(KindInvalid, "the ciphertext was re-keyed from version %d of key %q, below its min_decryption_version (%d): ciphertexts of retired versions are not decrypted, re-keyed or not", src, k.Name, k.MinDecryptionVersion)
		}
	}
	return nil
}

// Attest is For(nil).Attest.
func (s *Service) Attest(ctx context.Context, p *Principal, name string, n uint64, req AttestRequest) (*Attestation, *Statement, error) {
	return s.For(nil).Attest(ctx, p, name, n, req)
}

// VerifyAttestation checks an attestation's signature with the version of
// the identity key it names and returns its statement. It does not compare
// the statement with an envelope: the caller does (Statement.Covers).
func (s *Service) VerifyAttestation(ctx context.Context, a *Attestation) (*Statement, error) {
	if a == nil {
		return nil, Errorf(KindInvalid, "no attestation")
	}
	if a.SignedBy == 0 || a.SignedBy > math.MaxUint32 || len(a.Payload) == 0 || len(a.Payload) > 64<<10 || len(a.Signature) == 0 || len(a.Signature) > 8<<10 {
		return nil, Errorf(KindInvalid, "the attestation is malformed (payload, signature, signed_by)")
	}
	_, v, err := s.resolve(ctx, IdentityKeyName, a.SignedBy)
	if err != nil {
		return nil, Errorf(KindInvalid, "the attestation is signed by identity version %d, which this kmsd does not have", a.SignedBy)
	}
	kind, err := s.kinds.Lookup(IdentityKind)
	if err != nil {
		return nil, Wrap(KindInternal, "identity kind", err)
	}
	ok, err := kind.(SigningKind).Verify(v.PublicKey, a.Payload, []byte(AttestationContext), a.Signature)
	if err != nil || !ok {
		return nil, Errorf(KindInvalid, "the attestation's signature does not verify: kmsd did not issue it, or it was changed")
	}
	dec := json.NewDecoder(bytes.NewReader(a.Payload))
	dec.DisallowUnknownFields()
	var st Statement
	if err := dec.Decode(&st); err != nil {
		return nil, Wrap(KindInternal, "attestation statement", err)
	}
	if st.Type != StatementInput && st.Type != StatementEvaluation {
		return nil, Errorf(KindInternal, "attestation statement of type %q", st.Type)
	}
	return &st, nil
}

// vouchersActive refuses a statement whose token, or an input's token, is
// no longer active (revoked, expired, gone): revoking an encryptor or an
// evaluator withdraws what it vouched for.
func (s *Service) vouchersActive(ctx context.Context, st *Statement) error {
	ids := []string{st.By}
	for _, in := range st.Inputs {
		ids = append(ids, in.By)
	}
	now := s.clock.Now()
	for _, id := range ids {
		t, err := s.cachedToken(ctx, id)
		if errors.Is(err, ErrNotFound) || (err == nil && !t.Active(now)) {
			return Errorf(KindInvalid, "the token %s that vouched for this ciphertext (or one of its inputs) is revoked or expired: its attestations no longer count", clip(id, 20))
		}
		if err != nil {
			return asUnavailable("store", err)
		}
	}
	return nil
}

// noteAttestation names a statement in the request's audit record.
func noteAttestation(rec *AuditRecord, st *Statement) {
	if rec == nil {
		return
	}
	rec.Attestation = st.ID
	rec.Attester = st.By
	rec.AttestedOp = st.Type + ":" + st.Op
	rec.Inputs = nil
	for _, in := range st.Inputs {
		rec.Inputs = append(rec.Inputs, fmt.Sprintf("%s:%s", in.ID, in.By))
	}
}
