package hekeys

import (
	"context"
	"fmt"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/he/ciphertext"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// MaxEnvelopeCiphertext bounds the ciphertext of an envelope parsed
// without knowing its parameters: a degree-1 ciphertext at logN 16 with
// the 128-bit bound's 1747 bits of modulus is under 32 MiB.
const MaxEnvelopeCiphertext = 32 << 20

// ParseEnvelope decodes an envelope strictly and checks the form of every
// field; Keys.Open then checks it against a key version.
func ParseEnvelope(b []byte) (*client.Envelope, error) {
	return wire.ParseEnvelope(b, MaxEnvelopeCiphertext)
}

// rlweParams are the keys' parameters, whichever the scheme.
func (k *Keys) rlweParams() rlwe.Parameters {
	if k.Scheme == "bgv" {
		return k.BGV.Parameters
	}
	return k.CKKS.Parameters
}

// Encrypt encrypts values into the first slots of a CKKS ciphertext under
// the keys' public key, at the top level and the default scale, and
// returns its envelope. Nothing secret is needed: anyone with the verified
// public key can encrypt.
func (k *Keys) Encrypt(values []float64) (*client.Envelope, error) {
	if k.Scheme != "ckks" {
		return nil, fmt.Errorf("hekeys: Encrypt takes real values for ckks keys; this is a %s key", k.Scheme)
	}
	if len(values) == 0 || len(values) > k.CKKS.MaxSlots() {
		return nil, fmt.Errorf("hekeys: %d values; a %s ciphertext holds 1 to %d", len(values), k.Manifest.Key, k.CKKS.MaxSlots())
	}
	pt := ckks.NewPlaintext(k.CKKS, k.CKKS.MaxLevel())
	if err := ckks.NewEncoder(k.CKKS).Encode(values, pt); err != nil {
		return nil, err
	}
	ct, err := rlwe.NewEncryptor(k.CKKS, k.PublicKey).EncryptNew(pt)
	if err != nil {
		return nil, err
	}
	return k.Seal(ct, len(values))
}

// Seal wraps a ciphertext under these keys in an envelope, slots being how
// many of its slots hold values.
func (k *Keys) Seal(ct *rlwe.Ciphertext, slots int) (*client.Envelope, error) {
	b, err := ct.MarshalBinary()
	if err != nil {
		return nil, err
	}
	scale, _ := ct.Scale.Value.Float64()
	return &client.Envelope{Key: k.Manifest.Key, Version: k.Manifest.Version, ParamsID: k.Manifest.ParamsID,
		Level: ct.Level(), Scale: scale, Slots: slots, Ciphertext: b}, nil
}

// Open checks that env was made under exactly these keys (key, version,
// parameter id) and that it describes its ciphertext (level, scale,
// slots), and returns the ciphertext. Every refusal says what differs.
func (k *Keys) Open(env *client.Envelope) (*rlwe.Ciphertext, error) {
	if err := env.MatchVersion(k.Manifest.Key, k.Manifest.Version, k.Manifest.ParamsID); err != nil {
		return nil, err
	}
	return ciphertext.Open(k.rlweParams(), env)
}

// Decrypt has kmsd decrypt an envelope with the key version it names and
// returns the slots in use. c needs a decryptor (or admin) token for the
// key; the secret key never leaves kmsd, and each call counts against the
// version's decrypt budget.
func Decrypt(ctx context.Context, c *client.Client, env *client.Envelope) ([]float64, error) {
	return c.Decrypt(ctx, env)
}
