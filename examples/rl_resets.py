"""A recurrent PPO-style update with episode resets inside the fused layer (`resets=`).

The task needs memory: at the first step of an episode the observation shows a cue (one of
two), then blank steps follow (an episode lasts 3 to 10 steps); at the last step, marked in
the observation, the agent must repeat the cue (reward 1, else 0). A guess succeeds half of
the time; a policy that remembers the cue succeeds every time. 64 environments run side by
side; episodes end and restart at different steps of a rollout.

Every update collects a rollout of 32 steps (acting step by step, the state carried and zeroed
where an episode ended), then trains the policy on the whole rollout for a few epochs (clipped
policy-gradient objective and a value loss). That training pass is where the two variants
differ:

  fused      one call of rnnfused.LSTM over the rollout [T, B] with resets=done flags
  cell_loop  a Python loop of torch.nn.LSTMCell over the T steps, the state zeroed at resets

Both compute the same function (same seed, same starting weights); the script prints the
success rate of the last episodes and the training pass's steps per second of each.

    python examples/rl_resets.py               # both variants, 60 updates
    python examples/rl_resets.py --updates 20  # a short run
"""

import argparse
import time

import torch
from torch import nn

import rnnfused

OBS = 4  # cue A, cue B, "answer now", bias


class Memory:
    """Batched episodes of the cue task, all in torch."""

    def __init__(self, envs, generator):
        self.envs, self.generator = envs, generator
        self.cue = torch.zeros(envs, dtype=torch.long)
        self.length = torch.zeros(envs, dtype=torch.long)
        self.t = torch.zeros(envs, dtype=torch.long)
        self.restart(torch.ones(envs, dtype=torch.bool))

    def restart(self, which):
        n = int(which.sum())
        self.cue[which] = torch.randint(0, 2, (n,), generator=self.generator)
        self.length[which] = torch.randint(3, 11, (n,), generator=self.generator)
        self.t[which] = 0

    def observe(self):
        obs = torch.zeros(self.envs, OBS)
        first = self.t == 0
        obs[first, self.cue[first]] = 1.0
        obs[:, 2] = (self.t == self.length - 1).float()
        obs[:, 3] = 1.0
        return obs

    def step(self, action):
        """(reward, done, success) of the action every environment took; finished episodes restart."""
        last = self.t == self.length - 1
        success = last & (action == self.cue)
        reward = success.float()
        self.t += 1
        self.restart(last)
        return reward, last, success


class Policy(nn.Module):
    """An LSTM over observations, an actor head (2 actions) and a critic head."""

    def __init__(self, hidden, fused):
        super().__init__()
        self.fused = fused
        self.lstm = rnnfused.LSTM(OBS, hidden) if fused else nn.LSTMCell(OBS, hidden)
        self.actor = nn.Linear(hidden, 2)
        self.critic = nn.Linear(hidden, 1)

    def act(self, obs, state, reset):
        """One step while collecting: (action, state)."""
        h, c = (torch.where(reset.unsqueeze(1), 0.0, s) for s in state)
        if self.fused:
            _, (h, c) = self.lstm(obs.unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0)))
            h, c = h[0], c[0]
        else:
            h, c = self.lstm(obs, (h, c))
        action = torch.distributions.Categorical(logits=self.actor(h)).sample()
        return action, (h, c)

    def evaluate(self, obs, start, resets):
        """The rollout in one training pass: obs [T, B, OBS], start (h, c) of the rollout,
        resets [T, B] (an episode starts at that step). Returns logits [T, B, 2], values [T, B]."""
        if self.fused:
            output, _ = self.lstm(obs, (start[0].unsqueeze(0), start[1].unsqueeze(0)), resets=resets)
        else:
            h, c = start
            outputs = []
            for t in range(obs.size(0)):
                keep = (~resets[t]).float().unsqueeze(1)
                h, c = self.lstm(obs[t], (h * keep, c * keep))
                outputs.append(h)
            output = torch.stack(outputs)
        return self.actor(output), self.critic(output).squeeze(-1)


def train(fused, args):
    torch.manual_seed(args.seed)
    policy = Policy(args.hidden, fused)
    if not fused:  # the same starting weights as the fused variant
        torch.manual_seed(args.seed)
        twin = Policy(args.hidden, True)
        policy.lstm.load_state_dict({k.replace("_l0", ""): v for k, v in twin.lstm.state_dict().items()})
        policy.actor.load_state_dict(twin.actor.state_dict())
        policy.critic.load_state_dict(twin.critic.state_dict())
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    env = Memory(args.envs, torch.Generator().manual_seed(args.seed))
    state = (torch.zeros(args.envs, args.hidden), torch.zeros(args.envs, args.hidden))
    reset = torch.ones(args.envs, dtype=torch.bool)
    recent, train_seconds, train_steps = [], 0.0, 0
    for _ in range(args.updates):
        start = tuple(s.detach() for s in state)
        obs, actions, rewards, resets = [], [], [], []
        with torch.no_grad():
            for _ in range(args.steps):
                o = env.observe()
                action, state = policy.act(o, state, reset)
                reward, done, success = env.step(action)
                obs.append(o)
                actions.append(action)
                rewards.append(reward)
                resets.append(reset)
                recent += success[done].tolist()
                reset = done
        obs, actions, rewards, resets = map(torch.stack, (obs, actions, rewards, resets))
        # Returns within each episode (an episode's reward comes at its last step).
        dones = torch.cat([resets[1:], reset.unsqueeze(0)])
        returns = torch.zeros_like(rewards)
        running = torch.zeros(args.envs)
        for t in range(args.steps - 1, -1, -1):
            running = rewards[t] + args.gamma * running * (~dones[t]).float()
            returns[t] = running
        with torch.no_grad():
            old_logits, old_values = policy.evaluate(obs, start, resets)
            old_logp = torch.distributions.Categorical(logits=old_logits).log_prob(actions)
            advantages = returns - old_values
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        begin = time.perf_counter()
        for _ in range(args.epochs):
            logits, values = policy.evaluate(obs, start, resets)
            dist = torch.distributions.Categorical(logits=logits)
            ratio = (dist.log_prob(actions) - old_logp).exp()
            policy_loss = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages).mean()
            loss = policy_loss + 0.5 * (returns - values).pow(2).mean() - 0.01 * dist.entropy().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_seconds += time.perf_counter() - begin
        train_steps += args.epochs * args.steps * args.envs
    last = recent[-500:]
    return sum(last) / max(1, len(last)), train_steps / train_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--envs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32, help="rollout length")
    parser.add_argument("--epochs", type=int, default=4, help="training passes per rollout")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="fused,cell_loop")
    args = parser.parse_args()
    print(f"{args.updates} updates of {args.envs} environments x {args.steps} steps, {args.epochs} epochs each, "
          f"{torch.get_num_threads()} CPU threads; a guess succeeds 50% of the time")
    for variant in args.variants.split(","):
        success, speed = train(variant == "fused", args)
        print(f"{variant:10} success rate of the last episodes {success:6.1%}   training pass "
              f"{speed:9.0f} steps/s")


if __name__ == "__main__":
    main()
