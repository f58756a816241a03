package hekeys

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/he/threshold"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// ThresholdPlaintext is a threshold decryption's result: CKKS values
// (rounded to the precision the parties' flooding leaves) or BGV
// integers, the slots in use, and the parties that answered.
type ThresholdPlaintext struct {
	Values    []float64
	Integers  []uint64
	Precision int
	Parties   []string
}

// ThresholdDecrypt decrypts env, a ciphertext of a threshold key whose
// verified keys are k, without any party seeing the plaintext: it makes an
// ephemeral key pair, asks kmsd (c: a decryptor token) for t parties'
// partial decryptions towards its public key, combines them and decrypts
// with its secret key, which never leaves this process.
func ThresholdDecrypt(ctx context.Context, c *client.Client, k *Keys, env *client.Envelope) (*ThresholdPlaintext, error) {
	return ThresholdDecryptAs(ctx, c, k, env, nil, 0)
}

// ThresholdDecryptAs is ThresholdDecrypt signed by a requester: requester
// is the private key whose public key is policy.threshold.requesters[index]
// (every party checks the signature when the policy names requesters).
func ThresholdDecryptAs(ctx context.Context, c *client.Client, k *Keys, env *client.Envelope, requester *mldsa65.PrivateKey, index int) (*ThresholdPlaintext, error) {
	if k.Manifest.Threshold == nil {
		return nil, fmt.Errorf("hekeys: %s version %d is not a threshold key (decrypt it with Decrypt)", k.Manifest.Key, k.Manifest.Version)
	}
	ct, err := k.Open(env)
	if err != nil {
		return nil, err
	}
	rp := k.rlweParams()
	sk, pk := rlwe.NewKeyGenerator(rp).GenKeyPairNew()
	defer sk.Value.Q.Zero()
	target := threshold.EncodeTarget(pk)
	var rs *client.RequesterSignature
	if requester != nil {
		at := time.Now().Unix()
		sig := make([]byte, mldsa65.SignatureSize)
		if err := mldsa65.SignTo(requester, wire.ThresholdRequestMessage(env.Key, env.Version, env.Digest(), target, at), []byte(wire.ThresholdRequestContext), true, sig); err != nil {
			return nil, err
		}
		rs = &client.RequesterSignature{Index: index, Time: at, Signature: sig}
	}
	res, err := c.ThresholdDecrypt(ctx, env, target, rs)
	if err != nil {
		return nil, err
	}
	if t := k.Manifest.Threshold.T; len(res.Partials) != t || len(res.Active) != t || len(res.Parties) != t || res.Version != env.Version || res.Key != env.Key {
		return nil, verifyErr("the answer holds %d partial decryptions of %s version %d for a threshold of %d, of %s version %d", len(res.Partials), res.Key, res.Version, t, env.Key, env.Version)
	}
	for i, a := range res.Active {
		if a < 1 || a > len(k.Manifest.Threshold.Parties) || (i > 0 && a <= res.Active[i-1]) || k.Manifest.Threshold.Parties[a-1] != res.Parties[i] {
			return nil, verifyErr("the answering parties %v (%v) are not the key's", res.Active, res.Parties)
		}
	}
	out, err := threshold.Combine(rp, ct, res.Partials)
	if err != nil {
		return nil, err
	}
	pt := rlwe.NewDecryptor(rp, sk).DecryptNew(out)
	r := &ThresholdPlaintext{Precision: res.Precision, Parties: res.Parties}
	switch k.Scheme {
	case "ckks":
		vals := make([]float64, k.CKKS.MaxSlots())
		if err := ckks.NewEncoder(k.CKKS).Decode(pt, vals); err != nil {
			return nil, err
		}
		step := math.Ldexp(1, -max(res.Precision, 0))
		for i := range vals {
			vals[i] = math.Round(vals[i]/step) * step
		}
		r.Values = vals[:min(env.Slots, len(vals))]
	case "bgv":
		ints := make([]uint64, k.BGV.MaxSlots())
		if err := bgv.NewEncoder(k.BGV).Decode(pt, ints); err != nil {
			return nil, err
		}
		r.Integers = ints[:min(env.Slots, len(ints))]
	}
	return r, nil
}
