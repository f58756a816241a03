package hemcp

import (
	"context"
	"encoding/json"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"

	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/he/seedkey"
)

// TestRekeyNoiseBoundHolds: a fresh encryption under one secret, re-keyed
// with a switching key kmsd's generator makes (seeded, stored, expanded as
// a client does) to another secret, has noise within the bound kmsd
// attests for op rekey (one key switch on the fresh input), and the bound
// is not loose by more than 10 bits. The figures are README's noise cost
// of a re-keying.
func TestRekeyNoiseBoundHolds(t *testing.T) {
	for _, preset := range []string{"ckks-logn13", "ckks-logn14"} {
		t.Run(preset, func(t *testing.T) {
			from, skFrom := localKeys(t, preset, nil)
			p, err := he.Resolve(he.CKKS, json.RawMessage(`"`+preset+`"`))
			if err != nil {
				t.Fatal(err)
			}
			skTo := rlwe.NewKeyGenerator(p.CKKS).GenSecretKeyNew()
			store, err := he.OpenDirBlobs(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			blob, err := he.GenerateSwitching(context.Background(), p, skFrom, skTo, store, true)
			if err != nil {
				t.Fatal(err)
			}
			f, err := store.Open(context.Background(), blob.Digest)
			if err != nil {
				t.Fatal(err)
			}
			data, _ := io.ReadAll(f)
			f.Close()
			k, err := seedkey.Expand(p.RLWE(), seedkey.Switching, data)
			if err != nil {
				t.Fatal(err)
			}
			swk := k.(*rlwe.EvaluationKey)
			rng := rand.New(rand.NewPCG(5, 6))
			x := make([]float64, p.CKKS.MaxSlots())
			for i := range x {
				x[i] = rng.Float64()*2 - 1
			}
			env, err := from.Encrypt(x)
			if err != nil {
				t.Fatal(err)
			}
			to := from.Manifest
			to.Version = 2
			out, err := hekeys.Rekey(from, &to, swk, env)
			if err != nil {
				t.Fatal(err)
			}
			ct := rlwe.NewCiphertext(p.CKKS, 1, out.Level)
			if err := ct.UnmarshalBinary(out.Ciphertext); err != nil {
				t.Fatal(err)
			}
			kind := ckksKind()
			man := manifestFor(t, preset)
			fresh, _ := kind.NoiseBound(man, ct.Level(), nil, 0, 0)
			bound, err := kind.NoiseBound(man, ct.Level(), []float64{fresh}, 1, 1)
			if err != nil {
				t.Fatal(err)
			}
			before, _ := from.Open(env)
			mFresh := noiseLog2(t, p.CKKS, skFrom, before, x)
			m := noiseLog2(t, p.CKKS, skTo, ct, x)
			t.Logf("fresh: noise 2^%.1f (bound 2^%.1f); re-keyed: noise 2^%.1f, bound 2^%.1f", mFresh, fresh, m, bound)
			if m > bound {
				t.Errorf("re-keyed noise 2^%.1f above the attested bound 2^%.1f", m, bound)
			}
			if bound-m > 10 {
				t.Errorf("bound 2^%.1f loose by more than 10 bits over 2^%.1f", bound, m)
			}
			// Under the old secret the result is noise: re-keying moved it.
			if m := noiseLog2(t, p.CKKS, skFrom, ct, x); m < 40 {
				t.Errorf("the re-keyed ciphertext still decrypts under the old secret (noise 2^%.1f)", m)
			}
		})
	}
}
