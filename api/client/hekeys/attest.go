package hekeys

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// AttestInput has kmsd vouch for env as an encryption by the holder of c's
// token (an encryptor token for the key) and attaches the attestation:
// kmsd decrypts only attested ciphertexts and results computed from them.
func AttestInput(ctx context.Context, c *client.Client, env *client.Envelope) error {
	res, err := c.Attest(ctx, env.Key, env.Version, client.AttestRequest{
		Digest: env.Digest(), Level: env.Level, Scale: env.Scale, Slots: env.Slots, Op: "encrypt"})
	if err != nil {
		return err
	}
	env.Attestation = res.Attestation
	return nil
}

// AttestEvaluation has kmsd vouch for env as the result of op on the
// attested inputs (c: an evaluator token), which multiplies their noise by at
// most amplification (the largest sum of absolute weights of an output,
// at least 1) and does keySwitches key switches, and attaches the
// attestation.
func AttestEvaluation(ctx context.Context, c *client.Client, env *client.Envelope, op string, inputs []*client.Envelope, amplification float64, keySwitches int) error {
	req := client.AttestRequest{Digest: env.Digest(), Level: env.Level, Scale: env.Scale, Slots: env.Slots, Op: op,
		Amplification: max(amplification, 1), KeySwitches: keySwitches}
	for i, in := range inputs {
		if in.Attestation == nil {
			return fmt.Errorf("input %d has no attestation", i)
		}
		req.Inputs = append(req.Inputs, in.Attestation)
	}
	res, err := c.Attest(ctx, env.Key, env.Version, req)
	if err != nil {
		return err
	}
	env.Attestation = res.Attestation
	return nil
}

// VerifyAttestation checks env's attestation with the pinned identity key
// and that it covers env (its digest, key, version, parameters, level,
// scale and slots); it returns the statement. An evaluator calls it on
// every input before it computes: it refuses what kmsd did not attest.
func (k *Keys) VerifyAttestation(env *client.Envelope) (*wire.Statement, error) {
	return VerifyAttestation(k.IdentityKey, env)
}

// VerifyAttestation is Keys.VerifyAttestation with a pinned identity key.
func VerifyAttestation(identityKey []byte, env *client.Envelope) (*wire.Statement, error) {
	a := env.Attestation
	if a == nil {
		return nil, wire.Errorf(wire.KindInvalid, "the ciphertext has no attestation: encrypt it with kmsctl he encrypt (an encryptor token), or pass the envelope of an earlier result as it was given")
	}
	var pk mldsa65.PublicKey
	if err := pk.UnmarshalBinary(identityKey); err != nil {
		return nil, fmt.Errorf("hekeys: pinned identity key: %w", err)
	}
	if !mldsa65.Verify(&pk, a.Payload, []byte(wire.AttestationContext), a.Signature) {
		return nil, wire.Errorf(wire.KindInvalid, "the ciphertext's attestation is not signed by kmsd's identity key: it was made elsewhere or changed")
	}
	dec := json.NewDecoder(bytes.NewReader(a.Payload))
	dec.DisallowUnknownFields()
	var st wire.Statement
	if err := dec.Decode(&st); err != nil {
		return nil, wire.Errorf(wire.KindInvalid, "the attestation's statement does not parse")
	}
	if err := st.Covers(env); err != nil {
		return nil, err
	}
	return &st, nil
}
