package he

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"runtime"
	"slices"
	"sync"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring"
	"github.com/tuneinsight/lattigo/v6/utils/sampling"

	"github.com/kmsd-project/kmsd/he/seedkey"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// SeedSize is the size of the sealed secret: the secret key is derived from
// it, so the HSM-sealed material is 32 bytes, not the NTT form (MBs).
const SeedSize = 32

// SecretKey derives the secret key from a seed: a keyed PRNG (BLAKE2b XOF,
// domain-separated) through Lattigo's public ternary sampler, then the same
// basis extension, NTT and Montgomery form Lattigo's key generator applies.
func SecretKey(params rlwe.Parameters, seed []byte) (*rlwe.SecretKey, error) {
	if len(seed) != SeedSize {
		return nil, fmt.Errorf("seed is %d bytes, want %d", len(seed), SeedSize)
	}
	prng, err := sampling.NewKeyedPRNG(append([]byte("kmsd-he-secret-key-v1"), seed...))
	if err != nil {
		return nil, err
	}
	sampler, err := ring.NewSampler(prng, params.RingQ(), params.Xs(), false)
	if err != nil {
		return nil, err
	}
	sk := rlwe.NewSecretKey(params)
	rqp := params.RingQP().AtLevel(sk.LevelQ(), sk.LevelP())
	sampler.AtLevel(sk.LevelQ()).Read(sk.Value.Q)
	if levelP := sk.LevelP(); levelP > -1 {
		rqp.ExtendBasisSmallNormAndCenter(sk.Value.Q, levelP, sk.Value.Q, sk.Value.P)
	}
	rqp.NTT(sk.Value, sk.Value)
	rqp.MForm(sk.Value, sk.Value)
	return sk, nil
}

// KeySpec says which evaluation keys a version has.
type KeySpec struct {
	Rotations       []int
	Conjugation     bool
	Relinearization bool
}

// GaloisElements validates the rotations and returns the Galois elements,
// sorted and unique.
func GaloisElements(p *Params, spec KeySpec) ([]uint64, error) {
	slots := 0
	if p.Scheme == CKKS {
		slots = p.CKKS.MaxSlots()
	} else {
		slots = p.BGV.MaxSlots() / 2 // column rotations act on rows of N/2
	}
	var out []uint64
	seen := map[int]bool{}
	for _, k := range spec.Rotations {
		if k == 0 || k <= -slots || k >= slots {
			return nil, &ErrParams{fmt.Sprintf("rotation %d is outside ±(1..%d)", k, slots-1)}
		}
		if seen[k] {
			return nil, &ErrParams{fmt.Sprintf("rotation %d is listed twice", k)}
		}
		seen[k] = true
		if p.Scheme == CKKS {
			out = append(out, p.CKKS.GaloisElementForRotation(k))
		} else {
			out = append(out, p.BGV.GaloisElementForColRotation(k))
		}
	}
	if spec.Conjugation {
		if p.Scheme == CKKS {
			out = append(out, p.CKKS.GaloisElementForComplexConjugation())
		} else {
			out = append(out, p.BGV.GaloisElementForRowRotation())
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// KeySizes returns the serialized sizes of the public key, the
// relinearization key and one Galois key, computed from the parameters
// without generating anything.
func KeySizes(p *Params) (pk, rlk, gk int) {
	rp := p.RLWE()
	return rlwe.NewPublicKey(rp).BinarySize(), rlwe.NewRelinearizationKey(rp).BinarySize(), rlwe.NewGaloisKey(rp).BinarySize()
}

// EstimateSize is the total size of a keyset, before any work.
func EstimateSize(p *Params, spec KeySpec, galEls []uint64) int64 {
	pk, rlk, gk := KeySizes(p)
	total := int64(pk) + int64(len(galEls))*int64(gk)
	if spec.Relinearization {
		total += int64(rlk)
	}
	return total
}

// Blob is one generated key in the blob store.
type Blob struct {
	Kind          string // "public", "relinearization", "galois"
	GaloisElement uint64
	Digest        Digest
	Size          int64
	// Seeded: the blob is the key's seeded form (he/seedkey), and
	// FullDigest and FullSize are the expanded key's.
	Seeded     bool
	FullDigest Digest
	FullSize   int64
}

// ref is the blob's reference in a keyset.
func (b Blob) ref() kms.BlobRef {
	r := kms.BlobRef{Digest: string(b.Digest), Size: b.Size}
	if b.Seeded {
		r.Form, r.FullDigest, r.FullSize = wire.FormSeeded, string(b.FullDigest), b.FullSize
	}
	return r
}

// Progress reports generation progress: keys done of total, bytes written.
type Progress func(done, total int, bytes int64)

// Generate makes the public key and the evaluation keys of spec from the
// secret key, on workers goroutines (0: all cores), streaming each key to
// the blob store as soon as it is done, so that memory holds about one key
// per worker. Workers only write and hash; one more goroutine commits the
// staged blobs (fsync and rename, or upload) in the background, so the
// disk works while the cores generate. When Generate returns nil every blob is durable; on an
// error it removes what it wrote. The blobs are returned in a fixed order:
// public, relinearization, then Galois keys by element.
//
// seeded stores each key in its seeded form (he/seedkey: its b halves and
// the seed of its a halves, about half the bytes), with the digest and
// size of its full form alongside.
func Generate(ctx context.Context, p *Params, sk *rlwe.SecretKey, spec KeySpec, galEls []uint64, store Blobs, workers int, progress Progress, seeded bool) ([]Blob, error) {
	jobs := []genJob{{kind: "public"}}
	if spec.Relinearization {
		jobs = append(jobs, genJob{kind: "relinearization"})
	}
	for _, g := range galEls {
		jobs = append(jobs, genJob{kind: "galois", gal: g})
	}
	return generate(ctx, p.RLWE(), sk, jobs, store, workers, progress, seeded)
}

// GenerateGalois is Generate for the Galois keys of galEls alone (keys
// asked for after the version was made), in galEls' order.
func GenerateGalois(ctx context.Context, p *Params, sk *rlwe.SecretKey, galEls []uint64, store Blobs, workers int, progress Progress, seeded bool) ([]Blob, error) {
	var jobs []genJob
	for _, g := range galEls {
		jobs = append(jobs, genJob{kind: "galois", gal: g})
	}
	return generate(ctx, p.RLWE(), sk, jobs, store, workers, progress, seeded)
}

// GenerateSwitching writes the switching key from skFrom to skTo (two
// secret keys of parameters p) as a blob.
func GenerateSwitching(ctx context.Context, p *Params, skFrom, skTo *rlwe.SecretKey, store Blobs, seeded bool) (Blob, error) {
	out, err := generate(ctx, p.RLWE(), skTo, []genJob{{kind: "switching", skIn: skFrom}}, store, 1, nil, seeded)
	if err != nil {
		return Blob{}, err
	}
	return out[0], nil
}

// genJob is one key to generate.
type genJob struct {
	i    int
	kind string // "public", "relinearization", "galois", "switching"
	gal  uint64
	skIn *rlwe.SecretKey // switching: the key switched from
}

// generate makes the keys of jobs with the secret key sk (see Generate).
func generate(ctx context.Context, rp rlwe.Parameters, sk *rlwe.SecretKey, jobs []genJob, store Blobs, workers int, progress Progress, seeded bool) ([]Blob, error) {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	type job = genJob
	for i := range jobs {
		jobs[i].i = i
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var mu sync.Mutex
	var firstErr error
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
			cancel()
		}
		mu.Unlock()
	}

	// The syncer: fsync and rename in the order the workers finish.
	type written struct {
		j        job
		p        *Staged
		full     Digest
		fullSize int64
	}
	pending := make(chan written, len(jobs))
	out := make([]Blob, len(jobs))
	committed := make([]Digest, 0, len(jobs))
	syncerDone := make(chan struct{})
	go func() {
		defer close(syncerDone)
		done, bytes := 0, int64(0)
		for w := range pending {
			if ctx.Err() != nil {
				store.Abort(w.p)
				continue
			}
			if err := store.Commit(ctx, w.p); err != nil {
				fail(fmt.Errorf("store %s key: %w", w.j.kind, err))
				continue
			}
			committed = append(committed, w.p.Digest)
			out[w.j.i] = Blob{Kind: w.j.kind, GaloisElement: w.j.gal, Digest: w.p.Digest, Size: w.p.Size, Seeded: seeded, FullDigest: w.full, FullSize: w.fullSize}
			done++
			bytes += w.p.Size
			if progress != nil {
				progress(done, len(jobs), bytes)
			}
		}
	}()

	ch := make(chan job)
	var wg sync.WaitGroup
	for w := 0; w < min(workers, len(jobs)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kgen, err := newKeyGen(rp, sk) // not safe for concurrent use: one each
			if err != nil {
				fail(fmt.Errorf("key generator: %w", err))
				for range ch {
				}
				return
			}
			gk := rlwe.NewGaloisKey(rp) // reused: one Galois key in memory per worker
			for j := range ch {
				// Each key's a halves from its own fresh seed.
				seed, err := newASeed()
				if err != nil {
					fail(fmt.Errorf("seed: %w", err))
					continue
				}
				var key interface {
					seedkey.Key
					WriteTo(io.Writer) (int64, error)
				}
				switch j.kind {
				case "public":
					key, err = kgen.publicKey(seed)
				case "relinearization":
					key, err = kgen.relinearizationKey(seed)
				case "galois":
					key, err = kgen.galoisKey(j.gal, seed, gk)
				case "switching":
					key, err = kgen.switchingKey(j.skIn, seed)
				}
				if err != nil {
					fail(fmt.Errorf("generate %s key: %w", j.kind, err))
					continue
				}
				writeTo := func(w io.Writer) error { _, err := key.WriteTo(w); return err }
				var full Digest
				var fullSize int64
				if seeded {
					// The full form's digest and size, for the manifest:
					// what an expansion must give.
					h := sha256.New()
					n, err := key.WriteTo(h)
					if err != nil {
						fail(fmt.Errorf("generate %s key: %w", j.kind, err))
						continue
					}
					full, fullSize = Digest("sha256:"+hex.EncodeToString(h.Sum(nil))), n
					writeTo = func(w io.Writer) error { return seedkey.Encode(w, key, seed) }
				}
				pb, err := store.Stage(writeTo)
				if err != nil {
					fail(fmt.Errorf("store %s key: %w", j.kind, err))
					continue
				}
				pending <- written{j, pb, full, fullSize}
			}
		}()
	}
feed:
	for _, j := range jobs {
		select {
		case ch <- j:
		case <-ctx.Done():
			break feed
		}
	}
	close(ch)
	wg.Wait()
	close(pending)
	<-syncerDone
	if firstErr == nil {
		if err := ctx.Err(); err != nil {
			firstErr = err
		} else if err := store.Sync(ctx); err != nil {
			firstErr = fmt.Errorf("store keys: %w", err)
		}
	}
	if firstErr != nil {
		for _, d := range committed {
			_ = store.Remove(context.Background(), d)
		}
		return nil, firstErr
	}
	return out, nil
}
