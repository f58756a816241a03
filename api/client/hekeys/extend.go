package hekeys

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/tuneinsight/lattigo/v6/core/rlwe"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/he/seedkey"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// ExtensionContext is the ML-DSA context of manifest extension signatures.
const ExtensionContext = wire.ExtensionContext

// Extension is a version's verified manifest extension: the evaluation
// keys kmsd made for it after its manifest (nil: none).
func (k *Keys) Extension() *wire.ManifestExtension {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.extension
}

// setExtension keeps e if it is newer than the one k has.
func (k *Keys) setExtension(e *wire.ManifestExtension) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if e != nil && (k.extension == nil || e.Sequence > k.extension.Sequence) {
		k.extension = e
	}
}

// GaloisRefs lists the Galois keys the verified manifest and extension
// name, by element.
func (k *Keys) GaloisRefs() map[uint64]wire.GaloisRef {
	out := map[uint64]wire.GaloisRef{}
	for _, g := range k.Manifest.GaloisKeys {
		out[g.GaloisElement] = g
	}
	if e := k.Extension(); e != nil {
		for _, g := range e.GaloisKeys {
			out[g.GaloisElement] = g
		}
	}
	return out
}

// GaloisElement is the Galois element of a slot rotation (to the left) for
// the version's scheme: a CKKS rotation, a BGV column rotation.
func (k *Keys) GaloisElement(rotation int) uint64 {
	if k.Scheme == "bgv" {
		return k.BGV.GaloisElementForColRotation(rotation)
	}
	return k.CKKS.GaloisElementForRotation(rotation)
}

// ConjugationElement is the Galois element of the conjugation (CKKS) or
// the row swap (BGV).
func (k *Keys) ConjugationElement() uint64 {
	if k.Scheme == "bgv" {
		return k.BGV.GaloisElementForRowRotation()
	}
	return k.CKKS.GaloisElementForComplexConjugation()
}

// extension fetches and verifies the extension of the version of m: its
// signature by the pinned identity key, and that it is of the manifest's
// key, version and parameters. nil when the version has none.
func (f *Fetcher) extension(ctx context.Context, m *Manifest) (*wire.ManifestExtension, []byte, error) {
	path := fmt.Sprintf("/v1/keys/%s/versions/%d/evaluation-keys/extension", m.Key, m.Version)
	resp, err := f.get(ctx, path, nil)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, nil, err
	}
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNoContent:
		return nil, nil, nil // none
	default:
		return nil, nil, client.ProblemError(resp.StatusCode, b)
	}
	var se wire.SignedExtension
	if err := json.Unmarshal(b, &se); err != nil {
		return nil, nil, verifyErr("malformed manifest extension")
	}
	var pk mldsa65.PublicKey
	if err := pk.UnmarshalBinary(f.IdentityKey); err != nil {
		return nil, nil, fmt.Errorf("hekeys: pinned identity key: %w", err)
	}
	if se.Algorithm != "ml-dsa-65" || se.Context != ExtensionContext || !mldsa65.Verify(&pk, se.Document, []byte(ExtensionContext), se.Signature) {
		return nil, nil, verifyErr("the extension of %s version %d is not signed by the pinned identity key", m.Key, m.Version)
	}
	var e wire.ManifestExtension
	if err := json.Unmarshal(se.Document, &e); err != nil {
		return nil, nil, verifyErr("malformed manifest extension")
	}
	if e.Key != m.Key || e.Version != m.Version || e.ParamsID != m.ParamsID {
		return nil, nil, verifyErr("the extension is of %s version %d (%s), not of %s version %d (%s)", e.Key, e.Version, e.ParamsID, m.Key, m.Version, m.ParamsID)
	}
	return &e, b, nil
}

// refreshExtension fetches the version's extension again.
func (f *Fetcher) refreshExtension(ctx context.Context, k *Keys) error {
	e, _, err := f.extension(ctx, &k.Manifest)
	if err != nil {
		return err
	}
	k.setExtension(e)
	return nil
}

// FetchLazy is Fetch without the Galois keys: the verified manifest and
// extension, the public key and the relinearization key. GaloisKeys loads
// the Galois keys a computation needs, when it needs them.
func (f *Fetcher) FetchLazy(ctx context.Context, name string, version uint64) (*Keys, error) {
	k := &Keys{IdentityKey: f.IdentityKey, lazy: true}
	raw, _, err := f.manifest(ctx, name, version)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(raw, &k.Manifest); err != nil {
		return nil, verifyErr("malformed manifest")
	}
	return f.keys(ctx, k, true)
}

// GaloisKeys returns the Galois keys of rotations (slots to the left; and
// of the conjugation) of the version of k, verified: those its manifest
// or extension lists are loaded (from the cache when there); when
// generate is set, kmsd is asked to make the others (POST
// .../evaluation-keys, waiting for the operation of a large request) and
// the new extension is verified before they are loaded. Without
// generate, a key the version lacks is an error.
func (f *Fetcher) GaloisKeys(ctx context.Context, k *Keys, rotations []int, conjugation, generate bool) ([]*rlwe.GaloisKey, error) {
	var els []uint64
	for _, r := range rotations {
		els = append(els, k.GaloisElement(r))
	}
	if conjugation {
		els = append(els, k.ConjugationElement())
	}
	slices.Sort(els)
	els = slices.Compact(els)
	refs := k.GaloisRefs()
	var missing []uint64
	for _, e := range els {
		if _, ok := refs[e]; !ok {
			missing = append(missing, e)
		}
	}
	if len(missing) > 0 {
		if !generate {
			return nil, fmt.Errorf("hekeys: version %d of %s has no Galois key for elements %v (ask kmsd to generate them)", k.Manifest.Version, k.Manifest.Key, missing)
		}
		if err := f.requestGalois(ctx, k, rotations, conjugation); err != nil {
			return nil, err
		}
		if err := f.refreshExtension(ctx, k); err != nil {
			return nil, err
		}
		refs = k.GaloisRefs()
		for _, e := range missing {
			if _, ok := refs[e]; !ok {
				return nil, verifyErr("kmsd answered the request for Galois element %d, but the version's signed extension does not list it", e)
			}
		}
	}
	rp := k.rlweParams()
	pr := &progress{report: f.Progress}
	for _, e := range els {
		pr.total += refs[e].Size
	}
	out := make([]*rlwe.GaloisKey, 0, len(els))
	for _, e := range els {
		g := refs[e]
		data, err := f.blob(ctx, g.Digest, g.Size, pr)
		if err != nil {
			return nil, err
		}
		gk, err := decodeKey(rp, g.Ref(), seedkey.Galois, data, rlwe.NewGaloisKey(rp))
		if err != nil {
			return nil, verifyErr("galois key %d: %v", e, err)
		}
		if gk.GaloisElement != e {
			return nil, verifyErr("the blob listed for Galois element %d holds %d", e, gk.GaloisElement)
		}
		out = append(out, gk)
	}
	return out, nil
}

// OperationPoll is how often a Fetcher polls a background operation.
var OperationPoll = 200 * time.Millisecond

// requestGalois asks kmsd for the Galois keys of rotations, waiting for
// the operation if kmsd answers 202.
func (f *Fetcher) requestGalois(ctx context.Context, k *Keys, rotations []int, conjugation bool) error {
	c, err := f.client()
	if err != nil {
		return err
	}
	_, op, err := c.GaloisKeys(ctx, k.Manifest.Key, k.Manifest.Version, client.GaloisKeysRequest{Rotations: rotations, Conjugation: conjugation})
	if err != nil {
		return err
	}
	if op != nil {
		if _, err := c.WaitOperation(ctx, op.ID, OperationPoll, nil); err != nil {
			return err
		}
	}
	return nil
}

// client is an API client with the Fetcher's URL, token and HTTP client.
func (f *Fetcher) client() (*client.Client, error) {
	hc := f.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	return client.New(f.BaseURL, f.Token, client.WithHTTPClient(hc))
}

// SwitchingKey returns the verified switching key from the version of k to
// its later version to: the one k's extension lists, or, when generate is
// set, the one kmsd makes (POST .../switching-keys, an admin token; kmsd
// checks that to is enabled, of the same parameters, and k's version not
// below min_decryption_version).
func (f *Fetcher) SwitchingKey(ctx context.Context, k *Keys, to uint64, generate bool) (*rlwe.EvaluationKey, error) {
	find := func() (wire.SwitchingRef, bool) {
		if e := k.Extension(); e != nil {
			for _, s := range e.SwitchingKeys {
				if s.ToVersion == to {
					return s, true
				}
			}
		}
		return wire.SwitchingRef{}, false
	}
	ref, ok := find()
	if !ok {
		if err := f.refreshExtension(ctx, k); err != nil {
			return nil, err
		}
		ref, ok = find()
	}
	if !ok {
		if !generate {
			return nil, fmt.Errorf("hekeys: version %d of %s has no switching key to version %d: an administrator issues it (POST /v1/keys/%s/versions/%d/switching-keys {\"to_version\":%d})", k.Manifest.Version, k.Manifest.Key, to, k.Manifest.Key, k.Manifest.Version, to)
		}
		c, err := f.client()
		if err != nil {
			return nil, err
		}
		if _, err := c.SwitchingKey(ctx, k.Manifest.Key, k.Manifest.Version, to); err != nil {
			return nil, err
		}
		if err := f.refreshExtension(ctx, k); err != nil {
			return nil, err
		}
		if ref, ok = find(); !ok {
			return nil, verifyErr("kmsd made the switching key to version %d, but the signed extension does not list it", to)
		}
	}
	data, err := f.blob(ctx, ref.Digest, ref.Size, &progress{report: f.Progress, total: ref.Size})
	if err != nil {
		return nil, err
	}
	rp := k.rlweParams()
	swk, err := decodeKey(rp, ref.Ref(), seedkey.Switching, data, rlwe.NewEvaluationKey(rp))
	if err != nil {
		return nil, verifyErr("switching key to version %d: %v", to, err)
	}
	return swk, nil
}

// Rekey turns env, a ciphertext of the version of from, into a ciphertext
// of version to (its verified manifest) of the same key and parameters,
// with swk (Fetcher.SwitchingKey): one key switch, no decryption. The
// result has no attestation: an evaluator attests it (AttestEvaluation
// with op "rekey", env as the one input, amplification 1 and one key
// switch) before kmsd decrypts it under version to.
func Rekey(from *Keys, to *Manifest, swk *rlwe.EvaluationKey, env *client.Envelope) (*client.Envelope, error) {
	if to.Key != from.Manifest.Key || to.ParamsID != from.Manifest.ParamsID || to.Version <= from.Manifest.Version {
		return nil, fmt.Errorf("hekeys: re-keying goes to a later version of the same key and parameters: %s version %d (%s) to %s version %d (%s)", from.Manifest.Key, from.Manifest.Version, from.Manifest.ParamsID, to.Key, to.Version, to.ParamsID)
	}
	ct, err := from.Open(env)
	if err != nil {
		return nil, err
	}
	rp := from.rlweParams()
	out := rlwe.NewCiphertext(rp, 1, ct.Level())
	if err := rlwe.NewEvaluator(rp, nil).ApplyEvaluationKey(ct, swk, out); err != nil {
		return nil, fmt.Errorf("hekeys: re-key: %w", err)
	}
	b, err := out.MarshalBinary()
	if err != nil {
		return nil, err
	}
	return &client.Envelope{Key: to.Key, Version: to.Version, ParamsID: to.ParamsID, Level: env.Level, Scale: env.Scale, Slots: env.Slots, Ciphertext: b}, nil
}
