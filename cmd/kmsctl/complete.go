package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

// suggest returns the command closest to what was typed (the first one or
// two words), if one is close enough to be what was meant: within two
// edits of its name ("key list" for "keys list"), or a group's command
// typed without its group.
func suggest(words []string) string {
	typed := strings.Join(words[:min(2, len(words))], " ")
	best, bestD := "", 3
	for _, c := range commands {
		for _, t := range []string{typed, words[0]} {
			d := editDistance(t, c.name)
			if d < bestD || (d == bestD && best != "" && len(c.name) < len(best)) {
				best, bestD = c.name, d
			}
		}
		if _, sub, ok := strings.Cut(c.name, " "); ok && sub == words[0] && bestD > 0 {
			best, bestD = c.name, 0
		}
	}
	return best
}

// editDistance is the Levenshtein distance of a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

// completionCommand prints a completion script for a shell.
func init() { commands = append(commands, completionCommand) }

var completionCommand = command{
	name: "completion", synopsis: "bash|zsh|fish",
	help:  "print a shell completion script for kmsctl's commands: source <(kmsctl completion bash) (zsh: the same with zsh; fish: kmsctl completion fish | source)",
	nargs: 1,
}

// words returns the top-level words (commands and groups) and each group's
// commands.
func completionWords() ([]string, map[string][]string) {
	var top []string
	sub := map[string][]string{}
	for _, c := range commands {
		g, s, ok := strings.Cut(c.name, " ")
		if !slices.Contains(top, g) {
			top = append(top, g)
		}
		if ok {
			sub[g] = append(sub[g], s)
		}
	}
	return top, sub
}

func writeCompletion(w io.Writer, shell string) error {
	top, sub := completionWords()
	groups := make([]string, 0, len(sub))
	for _, g := range top {
		if len(sub[g]) > 0 {
			groups = append(groups, g)
		}
	}
	switch shell {
	case "bash", "zsh":
		if shell == "zsh" {
			fmt.Fprintln(w, "autoload -U +X bashcompinit && bashcompinit")
		}
		fmt.Fprintf(w, "_kmsctl() {\n  local cur=${COMP_WORDS[COMP_CWORD]} words\n  if [ \"$COMP_CWORD\" -eq 1 ]; then\n    words=%q\n  else\n    case ${COMP_WORDS[1]} in\n", strings.Join(top, " "))
		for _, g := range groups {
			fmt.Fprintf(w, "      %s) words=%q ;;\n", g, strings.Join(sub[g], " "))
		}
		fmt.Fprintf(w, "      *) words= ;;\n    esac\n    [ \"$COMP_CWORD\" -eq 2 ] || words=\n  fi\n  COMPREPLY=($(compgen -W \"$words\" -- \"$cur\"))\n}\ncomplete -o default -F _kmsctl kmsctl\n")
	case "fish":
		fmt.Fprintf(w, "complete -c kmsctl -f -n __fish_use_subcommand -a %q\n", strings.Join(top, " "))
		for _, g := range groups {
			fmt.Fprintf(w, "complete -c kmsctl -f -n '__fish_seen_subcommand_from %s' -a %q\n", g, strings.Join(sub[g], " "))
		}
	default:
		return usageError{fmt.Sprintf("completion: unknown shell %q: want bash, zsh or fish", shell)}
	}
	return nil
}
